"""Registry: metadata, name validation, suggestions, dotted-path factories."""

from __future__ import annotations

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
