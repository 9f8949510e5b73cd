"""run_evaluation in one process: rows, PNGs, rewards and set metrics equal direct calls; shared extractors;
references from folders and .npz files; bad input. The multi-process runs are in test_recipe_evaluate.py."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import rewardkit as rk
from rewardkit.eval_report import save_png
from rewardkit.image_io import load_image, pil_to_tensor
from rewardkit.integrations.evaluation import run_evaluation
from rewardkit.metrics.fid import FrechetDistance
from rewardkit.metrics.frechet import GaussianReference, GaussianStats, save_statistics
from rewardkit.metrics.kid import KID
from rewardkit.protocols import Reward, RewardOutput
from rewardkit.testing import random_images
from rewardkit.testing.metrics import PixelFeatures

PROMPTS = ["a cat", "a red dog", "tree", "a house by a lake", "sky"]
SEEDS = [0, 1, 2, 0, 1]
SIZE = 16
KID_OPTIONS = {"subsets": 5, "subset_size": 3, "small_set": "shrink"}


class FakePipeline:
    """One image per (prompt, generator): seeded noise plus a prompt-dependent shift, in [0, 1]."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, prompt, generator, num_inference_steps, output_type, height=SIZE, width=SIZE):
        assert output_type == "pt" and len(prompt) == len(generator)
        self.batches.append(len(prompt))
        noise = torch.stack([torch.rand(3, height, width, generator=g) for g in generator])
        shift = torch.tensor([len(p) % 5 / 10 for p in prompt]).view(-1, 1, 1, 1)
        return SimpleNamespace(images=noise * 0.5 + shift)


class Brightness(Reward):
    """Mean pixel value; NaN for prompts containing "sky" (a reward that cannot score some rows)."""

    name, requires_prompt, differentiable = "brightness", True, True

    def score(self, images, prompts, **context):
        scores = images.mean(dim=(1, 2, 3))
        mask = torch.tensor(["sky" in p for p in prompts])
        return RewardOutput(torch.where(mask, torch.full_like(scores, math.nan), scores))


class Redness(Reward):
    name, requires_prompt = "redness", False

    def score(self, images, prompts, **context):
        return RewardOutput(images[:, 0].mean(dim=(1, 2)))


class CountingFeatures(PixelFeatures):
    """PixelFeatures counting the images it embeds."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, prepared):
        self.seen += prepared.shape[0]
        return super().forward(prepared)


def _direct_images() -> torch.Tensor:
    pipe = FakePipeline()
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(PROMPTS, generators, 1, "pt").images


def _reference_folder(folder: Path) -> Path:
    for index, image in enumerate(random_images(7, SIZE, SIZE, seed=9)):
        save_png(image, folder / f"{index}.png")
    return folder


def test_rows_pngs_and_rewards_equal_direct_calls_for_any_batch_size(tmp_path: Path) -> None:
    images, reward = _direct_images(), Brightness()
    expected = reward(images, PROMPTS)
    results = []
    for batch_size in (2, 8):
        pipe = FakePipeline()
        result = run_evaluation(pipe, PROMPTS, SEEDS, {"bright": reward}, batch_size=batch_size,
                                call_kwargs={"num_inference_steps": 1}, image_dir=tmp_path / f"b{batch_size}")
        assert pipe.batches == ([2, 2, 1] if batch_size == 2 else [5]) and result.num_processes == 1
        results.append(result)
    for result in results:
        assert result.score_names == ["bright"]
        assert [(r["index"], r["prompt"], r["seed"]) for r in result.rows] == list(zip(range(5), PROMPTS, SEEDS))
        got = torch.tensor([r["bright"] for r in result.rows], dtype=torch.float64)
        # Same float32 scores widened to float64: exact, NaN rows stay NaN.
        assert torch.equal(got.isnan(), expected.isnan()) and math.isnan(result.rows[4]["bright"])
        assert torch.equal(got[:4], expected[:4].double())
        for row, image in zip(result.rows, images):
            assert Path(row["path"]).name == f"{row['index']:05d}_seed{row['seed']}.png"
            assert torch.equal(pil_to_tensor(load_image(row["path"])) * 255, (image * 255).round())


def test_set_metrics_share_the_extractor_and_equal_direct_metrics(tmp_path: Path) -> None:
    reference = _reference_folder(tmp_path / "reference")
    extractor = CountingFeatures().freeze()
    metrics = {"fid": FrechetDistance(extractor), "kid": KID(extractor, **KID_OPTIONS)}
    result = run_evaluation(FakePipeline(), PROMPTS, SEEDS, {"red": Redness()}, metrics,
                            references={"fid": reference, "kid": reference}, batch_size=2)
    assert extractor.seen == 7 + 5  # each reference and generated image embedded once for both metrics

    fid, kid = FrechetDistance(PixelFeatures().freeze()), KID(PixelFeatures().freeze(), **KID_OPTIONS)
    for metric in (fid, kid):
        metric.update(reference, real=True)
        metric.update(_direct_images(), real=False)
    # Same images; the float32 features of an image depend slightly on its batch (matmul blocking: batches of
    # 2, 2, 1 there, 5 here), measured 3.3e-8 relative on FID: stated tolerance 1e-6 relative.
    assert result.set_metrics["fid"]["value"] == pytest.approx(float(fid.compute()), rel=1e-6)
    assert [result.set_metrics["kid"]["value"], result.set_metrics["kid"]["std"]] == pytest.approx(
        kid.compute().tolist(), rel=1e-6)
    assert result.set_metrics["fid"] | {"value": 0} == {"value": 0, "std": None, "n": 5, "n_reference": 7,
                                                         "preset": "pixels", "extractor": "pixel-features"}
    assert result.set_metrics["kid"]["n_reference"] == 7


def test_npz_reference_equals_folder_reference(tmp_path: Path) -> None:
    reference = _reference_folder(tmp_path / "reference")
    extractor = PixelFeatures().freeze()
    rows = FrechetDistance(extractor).features(reference)
    stats = GaussianStats(extractor.feature_dim)
    stats.update(rows)
    save_statistics(tmp_path / "ref.npz", GaussianReference.from_stats(stats, extractor.identity()), rows)
    save_statistics(tmp_path / "no_rows.npz", GaussianReference.from_stats(stats, extractor.identity()))
    values = []
    for source in (reference, tmp_path / "ref.npz"):
        metrics = {"fid": FrechetDistance(extractor), "kid": KID(extractor, **KID_OPTIONS)}
        result = run_evaluation(FakePipeline(), PROMPTS, SEEDS, None, metrics, references=dict.fromkeys(metrics, source))
        values.append(result.set_metrics)
    for name in ("fid", "kid"):
        assert values[1][name]["value"] == pytest.approx(values[0][name]["value"], rel=1e-9)
        assert values[1][name]["n_reference"] == 7
    with pytest.raises(ValueError, match="holds no feature rows.*--features"):
        run_evaluation(FakePipeline(), PROMPTS, SEEDS, None, {"kid": KID(extractor, **KID_OPTIONS)},
                       references={"kid": tmp_path / "no_rows.npz"})


def test_composed_reward_adds_part_columns_and_keeps_its_zscore_statistics(tmp_path: Path) -> None:
    composed = rk.compose({Redness(): 1.0, Brightness(): 0.5}, normalize="zscore")
    before = {k: v.clone() for k, v in composed.state_dict().items()}
    result = run_evaluation(FakePipeline(), PROMPTS, SEEDS, {"total": composed})
    assert result.score_names == ["total", "redness", "brightness"]
    assert all(torch.equal(before[k], v) for k, v in composed.state_dict().items())  # evaluation does not learn
    assert composed.update_stats is True
    direct = Redness()(_direct_images())
    assert [r["redness"] for r in result.rows] == pytest.approx(direct.double().tolist(), rel=0, abs=0)


def test_bad_input_raises_with_a_fix(tmp_path: Path) -> None:
    pipe, reference = FakePipeline(), _reference_folder(tmp_path / "reference")
    with pytest.raises(ValueError, match="one seed per prompt"):
        run_evaluation(pipe, PROMPTS, SEEDS[:2])
    with pytest.raises(ValueError, match="has no reference.*fid-stats"):
        run_evaluation(pipe, PROMPTS, SEEDS, None, {"fid": FrechetDistance(PixelFeatures())})
    with pytest.raises(ValueError, match="appear twice"):
        run_evaluation(pipe, PROMPTS, SEEDS, {"redness": Redness(), "c": rk.compose({Redness(): 1.0})})
    with pytest.raises(ValueError, match="at least 2 images"):
        run_evaluation(pipe, PROMPTS[:1], SEEDS[:1], None, {"fid": FrechetDistance(PixelFeatures())},
                       references={"fid": reference})
    with pytest.raises(ValueError, match="not in set_metrics"):
        run_evaluation(pipe, PROMPTS, SEEDS, None, {"fid": FrechetDistance(PixelFeatures())},
                       references={"fid": reference, "kid": reference})
    used = FrechetDistance(PixelFeatures())
    used.update(random_images(2, SIZE, SIZE), real=False)
    with pytest.raises(ValueError, match="already holds generated images"):
        run_evaluation(pipe, PROMPTS, SEEDS, None, {"fid": used}, references={"fid": reference})
    assert pipe.batches == []  # every check happens before generating
