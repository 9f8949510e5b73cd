"""ImageReward: parity with the upstream package on identical tiny weights, both layouts, gradients, bf16.

Reference: the ``image-reward`` package (THUDM/ImageReward 1.5 on PyPI, installed ``--no-deps``): its own
``ImageReward.score`` / ``inference_rank`` / ``score_gard`` and BLIP ``vit.py`` / ``med.py`` run unchanged.
That code was written for transformers 4.x and timm 0.6, so ``rewardkit.testing.imagereward_upstream``
(shared with ``benchmarks/bench_imagereward.py``; its docstring lists every patch) bridges exactly what
transformers 5.x removed, with what 4.x did: ``fairscale``'s ``checkpoint_wrapper`` (used only for gradient
checkpointing) is an identity; ``apply_chunking_to_forward`` / ``prune_linear_layer`` come from
``transformers.pytorch_utils``; ``invert_attention_mask`` is 4.x's ``(1 - mask) * finfo.min`` and
``get_head_mask(None)`` is ``[None] * layers``; ``init_weights`` is skipped (the checkpoint overwrites every
weight). Upstream downloads its ViT-L and tokenizer, so the adapter builds them small: ``create_vit`` returns
a tiny upstream ``VisionTransformer`` and ``init_tokenizer`` does upstream's three calls on the tiny vocabulary
(its ``additional_special_tokens_ids`` attribute no longer exists in 5.x). ``ImageReward.mlp`` is rebuilt as
upstream ``MLP(32)`` for the tiny text width (upstream hard-codes 768). The tiny ``ImageReward.pt`` then
loads into the upstream model with ``strict=True``. A missing ``image-reward`` package is an ``ImportError``
(a failure), never a skip.

Tolerances (scores spread over about [-0.5, 0.5]; float32 rounding of the same computation, with SDPA in
place of upstream's explicit softmax attention): exact (PIL) path vs upstream ``score`` / ``inference_rank``
1e-5 absolute (measured 1.3e-6); tensor path at the model's resolution (no resize) vs ``score_gard`` 1e-5
(measured 5e-7); its pixel gradient vs upstream's, chained through ``Normalize``, 1e-4 relative (measured
8e-7 of the largest entry). With resizing the tensor path approximates PIL bicubic (measured up to 3e-3
here; bounded in tests/test_preprocess.py). The reference tokenizer is transformers 5.x's ``BertTokenizer``
(tokenizers-backed); upstream ran 4.x's Python one, which agrees on ordinary text.
"""

from __future__ import annotations

import pickle

import pytest
import torch

import rewardkit.testing as rkt
from rewardkit.image_io import pil_to_tensor
from rewardkit.nets.blip import ImageRewardConfig, ImageRewardNet
from rewardkit.rewards import imagereward as ir
from rewardkit.testing.imagereward import TINY_IMAGEREWARD_CONFIG, tiny_imagereward, tiny_imagereward_state
from rewardkit.testing.imagereward_upstream import upstream_imagereward
from rewardkit.weights import CheckpointMismatchError

from image_samples import random_pil_images

ATOL = 1e-5
PROMPTS = ["a photo of a cat", "a red car on a road", "a bowl of fruit", "a cat", "mountains at dawn", "an astronaut"]
SIZES = [(256, 240), (300, 224), (224, 227), (180, 400), (224, 224), (227, 229)]  # (w, h); crop excess 3 -> round
UPSTREAM_KEY_COUNT = 625  # ImageReward.pt / DiffSynth ImageReward/model.safetensors (clip_family.md 2.4)
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def kwargs(tmp_path_factory) -> dict:
    return tiny_imagereward(tmp_path_factory.mktemp("imagereward") / "upstream")


@pytest.fixture(scope="module")
def reward(kwargs) -> ir.ImageRewardReward:
    return ir.load(**kwargs)


@pytest.fixture(scope="module")
def upstream(kwargs):
    """The upstream ``ImageReward`` model on the same tiny checkpoint (``ImportError`` if the package is missing)."""
    with upstream_imagereward() as package:
        yield package.load(**kwargs)


def _upstream_tokens(model, prompts):
    tokens = model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    return tokens.input_ids, tokens.attention_mask


# ------------------------------------------------------------------------------------------------ parity
def test_exact_path_equals_upstream_score_and_inference_rank(reward, upstream) -> None:
    images = random_pil_images(SIZES)
    with torch.no_grad():
        expected = torch.tensor([upstream.score(p, im) for p, im in zip(PROMPTS, images)])
        _, ranked = upstream.inference_rank(PROMPTS[0], images)
    torch.testing.assert_close(reward.score_pil(images, PROMPTS), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(reward.score_pil(images, PROMPTS[0]), torch.tensor(ranked), rtol=0, atol=ATOL)
    assert expected.std() > 0.05, "tiny weights must separate the images"


def test_tensor_path_and_gradient_equal_upstream_score_gard(reward, upstream) -> None:
    import torchvision.transforms.functional as TF

    images = random_pil_images([(224, 224)] * 6, seed=10)  # the model's resolution: no resize on either side
    pixels = torch.stack([pil_to_tensor(im) for im in images])
    ids, mask = _upstream_tokens(upstream, PROMPTS)
    theirs_in = TF.normalize(pixels, reward.spec.mean, reward.spec.std).requires_grad_(True)
    theirs = upstream.score_gard(ids, mask, theirs_in)[:, 0]
    theirs.sum().backward()
    ours_in = pixels.clone().requires_grad_(True)
    ours = reward(ours_in, PROMPTS)
    ours.sum().backward()
    torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=ATOL)
    # d/dx of normalize(x) is 1/std per channel: chain upstream's gradient through it.
    chained = theirs_in.grad / torch.tensor(reward.spec.std)[:, None, None]
    torch.testing.assert_close(ours_in.grad, chained, rtol=1e-4, atol=1e-6)
    gard = reward.score_gard(ids, mask, theirs_in.detach())
    assert gard.shape == (6, 1)
    torch.testing.assert_close(gard[:, 0], theirs.detach(), rtol=0, atol=ATOL)


def test_tokenizer_matches_upstream(reward, upstream) -> None:
    prompts = ["A Photo of a CAT!", "[ENC] a dog [DEC]", " ".join(["mountains"] * 40), "naïve café 42", ""]
    ids, mask = reward.tokenize(prompts)
    expected_ids, expected_mask = _upstream_tokens(upstream, prompts)
    assert torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask)
    assert ids.shape == (5, ir.IMAGEREWARD_MAX_LENGTH) and ids[2, -1] == upstream.blip.tokenizer.sep_token_id


# ----------------------------------------------------------------------------------------- checkpoints
def test_upstream_and_diffsynth_layouts_give_the_same_scores(reward, tmp_path) -> None:
    diffsynth = ir.load(**tiny_imagereward(tmp_path, layout="diffsynth"))  # tokenizer found beside the weights
    images = rkt.random_images(4, 64, 48, seed=3)
    torch.testing.assert_close(diffsynth(images, PROMPTS[:4]), reward(images, PROMPTS[:4]), rtol=0, atol=0)
    folder = ir.load(weights=str(tmp_path / "ImageReward"), config=TINY_IMAGEREWARD_CONFIG)  # a folder works too
    torch.testing.assert_close(folder(images, PROMPTS[:4]), reward(images, PROMPTS[:4]), rtol=0, atol=0)


def test_default_architecture_has_exactly_the_625_upstream_keys() -> None:
    with torch.device("meta"):
        names = set(ImageRewardNet(ImageRewardConfig()).state_dict())
    upstream = {k if k.startswith("mlp.") else f"blip.{k}" for k in names}
    upstream |= {"blip.text_encoder.embeddings.position_ids"} | {f"blip.{p}_proj.{w}" for p in ("vision", "text")
                                                                   for w in ("weight", "bias")}
    assert len(upstream) == UPSTREAM_KEY_COUNT
    tiny = set(tiny_imagereward_state())
    assert {k.split(".")[1] for k in tiny} == {k.split(".")[1] for k in upstream}  # same parts, fewer layers


def test_module_prefix_is_stripped_and_other_checkpoints_are_rejected(kwargs, reward, tmp_path) -> None:
    state = torch.load(kwargs["weights"], weights_only=True)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ImageReward.pt")
    wrapped = ir.load(weights=str(tmp_path / "ImageReward.pt"), tokenizer=kwargs["tokenizer"], config=kwargs["config"])
    images = rkt.random_images(2, 40, 40, seed=4)
    torch.testing.assert_close(wrapped(images, "a cat"), reward(images, "a cat"), rtol=0, atol=0)
    clip = rkt.tiny_hpsv2(tmp_path / "hps")["weights"]
    with pytest.raises(ValueError, match="not an ImageReward checkpoint"):
        ir.load(weights=clip, tokenizer=kwargs["tokenizer"], config=kwargs["config"])
    del state["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(CheckpointMismatchError, match="1 missing keys.*crossattention.self.key.weight"):
        ir.load(weights=str(tmp_path / "broken.pt"), tokenizer=kwargs["tokenizer"], config=kwargs["config"])


def test_default_architecture_on_a_tiny_file_points_to_config(kwargs) -> None:
    with pytest.raises(CheckpointMismatchError, match="config=") as info:
        ir.load(weights=kwargs["weights"], tokenizer=kwargs["tokenizer"])
    assert "visual_encoder.pos_embed" in str(info.value)


# ------------------------------------------------------------------------------------- model behaviour
def test_every_input_and_layer_moves_the_score(reward) -> None:
    images = rkt.random_images(6, 64, 48, seed=5)
    base = reward(images, PROMPTS)
    assert base.std() > 0.05 and reward(images, "a cat").std() > 0.05, "the image must move the score"
    assert (reward(images, "a dog") - reward(images, "a cat")).abs().min() > 1e-3, "the prompt must move the score"
    layers = [*reward.net.visual_encoder.blocks, *reward.net.text_encoder.encoder.layer, reward.net.visual_encoder.norm,
              reward.net.text_encoder.embeddings, reward.net.visual_encoder.patch_embed]
    for layer in layers:
        saved = {k: v.clone() for k, v in layer.state_dict().items()}
        with torch.no_grad():
            for param in layer.parameters():
                param.mul_(0.5)
        moved = (reward(images, PROMPTS) - base).abs().max().item()
        layer.load_state_dict(saved)
        assert moved > 1e-3, f"{type(layer).__name__} does not move the score"


def test_repeated_prompts_are_tokenized_once_per_call(reward, monkeypatch) -> None:
    calls = []
    tokenizer = reward.tokenizer

    class Counting:
        def __len__(self) -> int:
            return len(tokenizer)

        def __call__(self, texts, **kwargs):
            calls.append(list(texts))
            return tokenizer(texts, **kwargs)

    monkeypatch.setattr(reward, "tokenizer", Counting())
    images = rkt.random_images(6, 40, 40, seed=6)
    grouped = reward(images, ["a cat"] * 3 + ["a dog"] * 3)
    assert calls == [["a cat", "a dog"]]
    singles = torch.cat([reward(images[i : i + 1], p) for i, p in enumerate(["a cat"] * 3 + ["a dog"] * 3)])
    torch.testing.assert_close(grouped, singles, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_is_close_to_fp32_and_returns_float32(kwargs, reward, dtype) -> None:
    images = rkt.random_images(6, 64, 48, seed=7)
    exact = reward(images, PROMPTS)
    fast = ir.load(**kwargs, dtype=dtype)
    scores = fast(images, PROMPTS)
    assert scores.dtype == torch.float32 and fast.evaluate(images, PROMPTS).details["raw"].dtype == torch.float32
    spread = (exact.max() - exact.min()).item()
    assert (scores - exact).abs().max().item() < 0.1 * spread
    pixels = images.clone().requires_grad_(True)
    fast(pixels, PROMPTS).sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    cast = pickle.loads(pickle.dumps(reward)).to(getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype]))
    cast_scores = cast(images, PROMPTS)  # weights in half precision: the MLP still runs in float32
    assert cast_scores.dtype == torch.float32 and (cast_scores - exact).abs().max().item() < 0.1 * spread


def test_bad_inputs_raise_with_a_fix(kwargs, reward) -> None:
    images = rkt.random_images(2, 40, 40)
    with pytest.raises(ValueError, match="needs a prompt"):
        reward(images)
    with pytest.raises(ValueError, match="one prompt or 2 prompts"):
        reward(images, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"imagereward.*\[0, 255\]"):
        reward(images * 255, "a cat")
    with pytest.raises(ValueError, match="max_length=600"):
        ir.load(**kwargs, max_length=600)
    with pytest.raises(ValueError, match="expected at least one image"):
        reward.score_pil([], "a cat")
    with pytest.raises(ValueError, match="preprocess the images first"):
        reward.score_gard(*reward.tokenize(["a cat"]), images[:1])
    small = {**kwargs["config"], "vocab_size": 10}
    with pytest.raises(CheckpointMismatchError, match="word_embeddings"):
        ir.load(weights=kwargs["weights"], tokenizer=kwargs["tokenizer"], config=small)
    with pytest.raises(TypeError, match="unknown fields"):
        ir.load(weights=kwargs["weights"], tokenizer=kwargs["tokenizer"], config={"width": 3})
    with pytest.raises(ValueError, match="not a multiple of vision_heads"):
        ImageRewardConfig(vision_width=50, vision_heads=3)
    with pytest.raises(ValueError, match="the tokenizer has"):
        ir.ImageRewardReward(ImageRewardNet({**kwargs["config"], "vocab_size": 20}), reward.tokenizer)


# ------------------------------------------------------------------------------------------- DiffSynth
@pytest.fixture(scope="module")
def registered():
    """The ``imagereward`` registry entry (the lead registers it in registry.py; added here if absent)."""
    from rewardkit import registry

    with pytest.MonkeyPatch.context() as patch:
        if "imagereward" not in registry.names():
            entry = registry.Entry("imagereward", "reward", "rewardkit.rewards.imagereward:load", "ImageReward",
                                   default_weights=ir.DEFAULT_WEIGHTS, tiny="tiny_imagereward")
            patch.setitem(registry._REGISTRY, "imagereward", entry)
        yield


def test_diffsynth_image_reward_metric(registered, reward, tmp_path, monkeypatch) -> None:
    from rewardkit.compat.diffsynth import ModelConfig
    from rewardkit.compat.diffsynth_imagereward import ImageRewardMetric

    for var in ("DIFFSYNTH_DOWNLOAD_SOURCE", "DIFFSYNTH_SKIP_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    tiny_imagereward(tmp_path / "DiffSynth-Studio" / "ImageMetrics", layout="diffsynth")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    metric = ImageRewardMetric.from_pretrained(device="cpu", config=TINY_IMAGEREWARD_CONFIG)  # DiffSynth's defaults
    images = random_pil_images(SIZES[:3])
    expected = reward.score_pil(images, PROMPTS[:3]).tolist()
    assert metric.compute(PROMPTS[:3], images) == expected
    assert metric.score("a cat", images) == reward.score_pil(images, "a cat").tolist()
    rows = metric.evaluate(PROMPTS[:3], images)
    assert [row["score"] for row in rows] == expected and all("raw" in row for row in rows)
    with pytest.raises(ValueError, match="2 prompts and 3 images"):
        metric.compute(PROMPTS[:2], images)
    folder = tmp_path / "DiffSynth-Studio" / "ImageMetrics" / "ImageReward"
    bf16 = ImageRewardMetric.from_pretrained(ModelConfig(path=str(folder / "model.safetensors")),
                                             ModelConfig(path=str(folder)), torch.bfloat16, "cpu", max_length=20,
                                             config=TINY_IMAGEREWARD_CONFIG)
    assert bf16.reward.max_length == 20 and bf16.reward.autocast_dtype == torch.bfloat16
    assert all(isinstance(v, float) for v in bf16.compute("a cat", images))


# ------------------------------------------------------------------------------------ upstream adapter
def test_upstream_adapter_is_undone_on_exit_and_a_missing_package_is_an_error(kwargs, monkeypatch) -> None:
    import importlib.util
    import sys
    import warnings

    import transformers.modeling_utils as modeling_utils

    def state():  # the `upstream` fixture may hold the adapter open: compare with what was there before
        modules = {n: m for n, m in sys.modules.items() if n.split(".")[0] in ("ImageReward", "fairscale")}
        return modules, getattr(modeling_utils, "prune_linear_layer", None), list(warnings.filters)

    before = state()
    with upstream_imagereward() as package:
        assert package.load(**kwargs).mlp.layers[0].in_features == TINY_IMAGEREWARD_CONFIG["text_width"]
    assert state() == before
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ImportError, match="pip install --no-deps image-reward"):
        with upstream_imagereward():
            pass
