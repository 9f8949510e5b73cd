"""A composition hands each keyword (``reference=``, ``metadata=``, ...) to the parts that take it."""

from __future__ import annotations

import pytest
import torch

import rewardkit as rk
from rewardkit.protocols import Reward, RewardOutput


class NeedsMetadata(Reward):
    """Scores the number in each row's metadata record; refuses any other keyword (as geneval does)."""

    name, requires_prompt, differentiable = "needs-metadata", False, False
    context_keys = frozenset({"metadata"})

    def score(self, images, prompts, *, metadata=None, **context):
        assert not context, f"unexpected {sorted(context)}"
        return RewardOutput(torch.tensor([float(record["value"]) for record in metadata]))


class TakesAnything(Reward):
    """A user reward that declares nothing: it receives every keyword."""

    name, requires_prompt, differentiable = "takes-anything", False, False

    def score(self, images, prompts, **context):
        return RewardOutput(torch.full((images.shape[0],), float(len(context))))


def test_each_keyword_reaches_only_the_parts_that_take_it():
    images = torch.rand(3, 3, 16, 16)
    total = rk.compose({NeedsMetadata(): 1.0, "psnr": 0.0, "jpeg-compressibility": 0.0, TakesAnything(): 1.0})
    out = total.evaluate(images, metadata=[{"value": v} for v in (1, 2, 3)], reference=images.flip(0))
    assert out.details["needs-metadata"].tolist() == [1.0, 2.0, 3.0]
    assert torch.isinf(out.details["psnr"][1]) and torch.isfinite(out.details["psnr"][0])  # row 1 is its own mirror
    assert out.details["takes-anything"].tolist() == [2.0, 2.0, 2.0]  # metadata and reference
    assert out.scores.tolist() == [3.0, 4.0, 5.0]


def test_a_keyword_no_part_takes_is_refused_before_scoring():
    total = rk.compose({NeedsMetadata(): 1.0, "psnr": 1.0})
    with pytest.raises(TypeError, match=r"no part takes \['metdata'\].*needs-metadata.*metadata"):
        total(torch.rand(2, 3, 8, 8), metdata=[{"value": 1}] * 2, reference=torch.rand(2, 3, 8, 8))


def test_exact_path_routes_keywords_too():
    from PIL import Image

    pil = [Image.new("RGB", (8, 8), (v, v, v)) for v in (10, 200)]
    total = rk.compose({NeedsMetadata(): 1.0, "jpeg-compressibility": 0.0})
    out = total.evaluate_pil(pil, metadata=[{"value": 5}, {"value": 7}])
    assert out.details["needs-metadata"].tolist() == [5.0, 7.0]
