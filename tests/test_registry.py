"""Registry: metadata, name validation, suggestions, dotted-path factories."""

from __future__ import annotations

import inspect

import pytest

import rewardkit as rk
from rewardkit.registry import Entry, get_entry, names, register

BUILT_IN = {"clip-score", "pickscore", "hpsv2", "hpsv2.1", "aesthetic", "bioclip"}


def test_built_ins_are_listed_with_metadata() -> None:
    listed = {row["name"]: row for row in rk.list_rewards()}
    assert BUILT_IN <= set(listed)
    assert listed["aesthetic"]["requires_prompt"] is False
    assert all(listed[n]["differentiable"] for n in BUILT_IN)
    assert all(listed[n]["default_weights"] and listed[n]["upstream"] for n in BUILT_IN)


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(KeyError, match="did you mean 'pickscore'"):
        rk.load("pickscor")
    with pytest.raises(KeyError, match="rewardkit list"):
        get_entry("no-such-reward-at-all")


@pytest.mark.parametrize("bad", ["", " pickscore", "Pick", "two words"])
def test_invalid_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid reward name"):
        register(Entry(bad, "reward", "m:f", "x"))


def test_duplicates_and_bad_targets_are_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(Entry("pickscore", "reward", "m:f", "x"))
    with pytest.raises(ValueError, match="module:function"):
        register(Entry("new-reward", "reward", "no_colon", "x"))
    with pytest.raises(ValueError, match="kind"):
        register(Entry("new-reward", "thing", "m:f", "x"))  # type: ignore[arg-type]


_USER_MODULE = """
import torch

from rewardkit.protocols import Reward, RewardOutput


class Constant(Reward):
    name = "constant"
    requires_prompt = False
    differentiable = False

    def __init__(self, value):
        super().__init__()
        self.value = value

    def score(self, images, prompts, **context):
        return RewardOutput(torch.full((images.shape[0],), self.value))


def make_constant_reward(weights=None, device=None, dtype=None, value=1.0):
    return Constant(value).freeze()
"""


def test_dotted_path_factories_load_user_rewards(tmp_path, monkeypatch) -> None:
    import torch

    # A user's own module, importable from sys.path (a package named "tests" may exist in
    # site-packages: torch-fidelity installs one, so this test must not rely on that name).
    (tmp_path / "my_rewards_for_rk_test.py").write_text(_USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = rk.load("my_rewards_for_rk_test:make_constant_reward", value=3.0)
    assert reward(torch.zeros(2, 3, 8, 8)).tolist() == [3.0, 3.0]


def test_kinds_filter() -> None:
    assert set(names("reward")) >= BUILT_IN
    assert not set(names("distribution")) & BUILT_IN


# --- unknown options -----------------------------------------------------------------------------------
# Built without weights (no model) or, for the VLM judges, against a server that is never contacted.
_NO_WEIGHTS = ("ssim", "ms-ssim", "psnr", "jpeg-compressibility", "jpeg-incompressibility")
_SERVED = {"server": "http://127.0.0.1:9/v1", "served_model": "judge"}


def _misspelt(option: str) -> str:
    return option[:-1] + ("x" if option[-1] != "x" else "y")


@pytest.mark.parametrize("name", names())
def test_every_entry_rejects_a_misspelt_option_before_loading(name: str) -> None:
    """One line naming the reward, the option, the closest valid one and all valid ones, raised before any
    weight is resolved (the session is offline: a later check would fail on the weights instead)."""
    from rewardkit.registry import option_defaults

    valid = option_defaults(name)
    assert valid, f"{name}: its options cannot be listed; declare where its **options go"
    option = sorted(valid)[0]
    with pytest.raises(TypeError) as info:
        rk.load(name, **{_misspelt(option): 1})
    message = str(info.value)
    assert message.startswith(f"{name}: unknown option {_misspelt(option)!r} (did you mean {option!r}?); "
                              f"valid options: {', '.join(sorted(valid))}"), message
    assert "\n" not in message
    with pytest.raises(TypeError, match=rf"^{name}: unknown option 'devise' \(did you mean 'device'\?\)"):
        rk.load(name, devise="cpu")


@pytest.mark.parametrize("name", _NO_WEIGHTS)
def test_weightless_entries_accept_every_listed_option(name: str) -> None:
    """Every option the registry lists is really taken by the factory (each at its own default value)."""
    from rewardkit.registry import option_defaults

    for option, default in option_defaults(name).items():
        assert default is not inspect.Parameter.empty, (name, option)
        assert rk.load(name, **{option: default}) is not None


@pytest.mark.parametrize(("name", "options"), [
    ("unified-reward-2", {"timeout": 5.0, "prompt_variant": "diffsynth"}),
    ("unified-reward-edit", {"retries": 1, "task": "edit_pairwise_rank"}),
    ("qwen-image-bench", {"max_concurrency": 2, "resize_long_edge": 512}),
])
def test_judges_accept_forwarded_options(name: str, options: dict) -> None:
    """Options that a judge's factory forwards through **options to its backend / judge are listed and taken."""
    from rewardkit.registry import option_defaults

    assert set(options) <= set(option_defaults(name))
    assert rk.load(name, **_SERVED, **options) is not None


def test_fid_accepts_metric_options_that_pass_through(tiny_root) -> None:
    """``load_fid(**options)`` -> ``FrechetDistance`` -> ``FeatureMetric``: options of the whole chain are valid."""
    import rewardkit.testing as rkt

    metric = rkt.load_tiny("fid", tiny_root / "upstream", batch_size=4, quantize=True, progress=False)
    assert metric.batch_size == 4
    with pytest.raises(TypeError, match=r"^fid: unknown option 'resize'.*; valid options: .*preset"):
        rkt.load_tiny("fid", tiny_root / "upstream", resize="clean")


def test_user_factories_are_checked_by_their_signature(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_rewards_for_rk_options.py").write_text(_USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match=r"unknown option 'valeu' \(did you mean 'value'\?\); valid options: value"):
        rk.load("my_rewards_for_rk_options:make_constant_reward", valeu=3.0)


def test_per_row_inputs_are_registry_metadata(capsys) -> None:
    """geneval declares metadata= (not ``generative``: it parses no text) and `rewardkit list` shows it under
    NEEDS; ocr declares the prompt form it reads, and that example is one its tiny model can score (not NaN)."""
    from rewardkit.cli import main

    geneval, ocr = get_entry("geneval"), get_entry("ocr")
    assert geneval.requires_metadata and not geneval.generative and not geneval.requires_prompt
    assert not ocr.requires_metadata and not ocr.generative and ocr.example_prompt.count('"') == 2
    assert all(e.requires_prompt for e in map(get_entry, names()) if e.example_prompt)  # the example is a prompt
    assert main(["list"]) == 0
    rows = {line.split()[0]: line.split()[4] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["geneval"] == "metadata=" and rows["ssim"] == "reference=" and rows["pickscore"] == "-"


def test_example_prompt_is_scored(tiny_reward) -> None:
    import rewardkit.testing as rkt

    out = tiny_reward("ocr").evaluate(rkt.random_images(2, 64, 64), get_entry("ocr").example_prompt)
    assert out.details["failure"] == [None, None] and bool(out.scores.isfinite().all())
    assert out.details["target"] == [get_entry("ocr").example_prompt.split('"')[1]] * 2  # the quoted text
