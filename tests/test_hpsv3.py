"""HPSv3: parity with the upstream formula on identical tiny weights, both layouts, positions, paths, gradients, bf16.

Reference: the ``hpsv3`` package pins transformers 4.45.2 and cannot be installed beside transformers 5.x, so
:func:`_reference_logits` reproduces, written here independently of rewardkit, what upstream's
``HPSv3RewardInferencer.reward`` computes (reference/vlm_family.md 3.2-3.5): PIL ``BICUBIC`` resize to the
smart size; ``processor.apply_chat_template`` + ``processor(text, images, padding=True)`` with right padding and
``<|Reward|>`` added to the tokenizer; transformers' own ``Qwen2VLForConditionalGeneration`` loaded with
``strict=True`` from the upstream-layout file (keys renamed here as transformers' conversion mapping does,
``lm_head`` included), its rotary ``inv_freq`` buffers rounded to bf16 as upstream's ``model.to(torch.bfloat16)``
leaves them (weights stay float32 here); ``Qwen2VLRewardModelBT.forward``: token embeddings with the vision
tower's merged features scattered into the ``<|image_pad|>`` slots, the text model run on ``inputs_embeds`` with
``position_ids=None`` (transformers fills in ``arange(L)`` on the three M-RoPE axes, as 4.45.2 did), ``rm_head``
(an ``nn.Sequential``) in float32 on every token, the rows of the ``<|Reward|>`` mask. The DiffSynth reference
passes ``input_ids``, ``image_grid_thw`` and ``mm_token_type_ids`` instead (3-D M-RoPE positions).

Tolerances: model outputs 1e-5 of the largest |score| (float32 rounding of the same computation; measured 1e-7 to
3e-7 absolute on scores of about 0.2-0.6). Tensor-path ``pixel_values`` vs the processor's without a resize: 1e-6 absolute (measured 2.4e-7: the
processor folds 1/255 into mean and std). With a resize the tensor path skips PIL's uint8 rounding: measured
|delta| up to 1.0e-3 on smooth 200x300 images (score spread ~0.35), bounded here by 3e-3.
"""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.nets.hpsv3 import HEAD_HIDDEN, HPSv3Net, hpsv3_key_map, hpsv3_qwen2vl_config
from rewardkit.rewards import hpsv3
from rewardkit.testing.hpsv3 import tiny_hpsv3
from rewardkit.weights import CheckpointMismatchError, read_state_dict

from image_samples import random_pil_images

RTOL = 1e-5
PROMPTS = ["a photo of a cat", "a red car on a road", "mountains at dawn"]
SIZES = [(40, 48), (90, 60), (56, 56)]  # (w, h): three aspect ratios -> three image grids in one batch
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def kwargs(tmp_path_factory) -> dict:
    return tiny_hpsv3(tmp_path_factory.mktemp("hpsv3") / "upstream")


@pytest.fixture(scope="module")
def reward(kwargs) -> hpsv3.HPSv3Reward:
    return hpsv3.load(**kwargs)


def _as_tensor(pils: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pils]).float() / 255


def _build_reference(kwargs: dict, bf16_rope: bool = True):
    """transformers ``Qwen2VLForConditionalGeneration`` + an ``nn.Sequential`` head on the upstream file."""
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    state = read_state_dict(kwargs["weights"])
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**kwargs["config"])).eval()
    renamed = {("model." + k if k.startswith("visual.") else "model.language_model." + k[6:] if k.startswith("model.")
                else k): v for k, v in state.items() if not k.startswith("rm_head.")}
    model.load_state_dict(renamed, strict=True)
    if bf16_rope:  # upstream's model.to(torch.bfloat16) also casts the rotary inv_freq buffers
        for name, buffer in model.named_buffers():
            if name.endswith("inv_freq"):
                buffer.data = buffer.data.to(torch.bfloat16).to(torch.float32)
    hidden = model.config.text_config.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(hidden, HEAD_HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(HEAD_HIDDEN, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).eval()
    head.load_state_dict({k[len("rm_head."):]: v for k, v in state.items() if k.startswith("rm_head.")}, strict=True)
    processor = AutoProcessor.from_pretrained(kwargs["processor"], padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    return model, head, processor


@pytest.fixture(scope="module")
def reference(kwargs):
    return _build_reference(kwargs)


def _reference_logits(reference, pils: list[Image.Image], prompts: list[str], mode: str = "sequential"):
    model, head, processor = reference
    resized = []
    for image in pils:
        h, w = hpsv3.smart_resize(image.height, image.width)
        resized.append(image.resize((w, h), Image.BICUBIC))
    messages = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": (
        hpsv3.HPSV3_INSTRUCTION.format(text_prompt=p) + hpsv3.HPSV3_SUFFIX)}]}] for im, p in zip(resized, prompts)]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=text, images=resized, padding=True, return_tensors="pt")
    with torch.no_grad():
        if mode == "sequential":  # Qwen2VLRewardModelBT.forward on transformers 4.45.2
            embeds = model.model.language_model.embed_tokens(batch["input_ids"])
            image = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
            mask = (batch["input_ids"] == model.config.image_token_id)[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(mask, image)
            states = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                                position_ids=None).last_hidden_state
        else:  # DiffSynth HPSv3RewardModelMixin.forward on transformers 5.x
            states = model.model(**batch).last_hidden_state
        logits = head(states.float())
    special = batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|Reward|>")
    return logits[special].view(len(pils), -1)


def test_prompt_is_byte_exact() -> None:
    digest = lambda s: hashlib.sha256(s.encode()).hexdigest()[:16]  # noqa: E731
    assert (len(hpsv3.HPSV3_INSTRUCTION), digest(hpsv3.HPSV3_INSTRUCTION)) == (2523, "0393599dad45a971")
    assert (len(hpsv3.build_prompt("a dog")), digest(hpsv3.build_prompt("a dog"))) == (2582, "fefcfbca335e58ae")
    assert hpsv3.build_messages("x")[0]["content"][0] == {"type": "image"}


def test_chat_text_has_the_default_system_turn_and_one_reward_token(reward) -> None:
    text = reward._texts(["a {braced} prompt"])[0]
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.count("<|Reward|>") == 1 and "Textual prompt - a {braced} prompt\n" in text
    assert text.endswith("END\n<|im_end|>\n<|im_start|>assistant\n")


def test_smart_resize_golden_cases() -> None:
    assert hpsv3.smart_resize(1024, 1024) == (448, 448)
    assert hpsv3.smart_resize(768, 1360) == (336, 588)
    small = dict(min_pixels=64 * 28 * 28, max_pixels=64 * 28 * 28)
    assert hpsv3.smart_resize(64, 64, **small) == (224, 224)
    assert hpsv3.smart_resize(48, 96, **small) == (168, 336)
    with pytest.raises(ValueError, match="aspect ratio"):
        hpsv3.smart_resize(10, 2010)


def test_exact_path_matches_upstream_formula(reward, reference) -> None:
    pils = random_pil_images(SIZES)
    expected = _reference_logits(reference, pils, PROMPTS)
    out = reward.evaluate_pil(pils, PROMPTS)
    scale = expected[:, 0].abs().max()
    torch.testing.assert_close(out.scores, expected[:, 0], rtol=0, atol=RTOL * scale)
    torch.testing.assert_close(out.details["log_sigma"], expected[:, 1], rtol=0, atol=RTOL * expected[:, 1].abs().max())
    torch.testing.assert_close(out.details["sigma"], out.details["log_sigma"].exp())
    assert out.scores.std() > 100 * RTOL * scale, "random tiny weights must separate the rows"


def test_mrope_mode_matches_diffsynth_formula_and_differs_from_sequential(kwargs, reward, reference) -> None:
    pils = random_pil_images(SIZES)
    mrope = hpsv3.load(**kwargs, position_mode="mrope")
    expected = _reference_logits(reference, pils, PROMPTS, mode="mrope")
    scores = mrope.score_pil(pils, PROMPTS)
    torch.testing.assert_close(scores, expected[:, 0], rtol=0, atol=RTOL * expected[:, 0].abs().max())
    assert (scores - reward.score_pil(pils, PROMPTS)).abs().max() > 1e-3


def test_exact_rotary_frequencies_are_an_option(kwargs, reward) -> None:
    pils = random_pil_images(SIZES)
    exact_rope = hpsv3.load(**kwargs, rope_dtype="fp32")
    expected = _reference_logits(_build_reference(kwargs, bf16_rope=False), pils, PROMPTS)[:, 0]
    scores = exact_rope.score_pil(pils, PROMPTS)
    torch.testing.assert_close(scores, expected, rtol=0, atol=RTOL * expected.abs().max())
    assert (scores - reward.score_pil(pils, PROMPTS)).abs().max() > 1e-4  # measured up to 4.9e-3 (spread ~0.35)


def test_both_layouts_load_to_identical_scores(tmp_path, kwargs, reward) -> None:
    other = tiny_hpsv3(tmp_path, layout="diffsynth")
    assert "processor" not in other  # DiffSynth's HPSv3/ folder holds the processor beside the weights
    upstream_keys, diffsynth_keys = set(read_state_dict(kwargs["weights"])), set(read_state_dict(other["weights"]))
    assert "visual.merger.ln_q.weight" in upstream_keys and "model.visual.merger.ln_q.weight" in diffsynth_keys
    images = _as_tensor(random_pil_images([(48, 40)] * 2))
    torch.testing.assert_close(hpsv3.load(**other)(images, PROMPTS[:2]), reward(images, PROMPTS[:2]), rtol=0, atol=0)


@pytest.mark.parametrize("size", [(448, 448), (896, 224)])  # (w, h): fixed points of the 256-token smart resize
def test_tensor_path_pixel_values_equal_the_processor_without_resize(reward, size) -> None:
    pils = random_pil_images([size, size], seed=5)
    assert reward.target_size(size[1], size[0]) == (size[1], size[0])
    ours = reward.pixel_inputs(_as_tensor(pils))
    theirs = reward.processor.image_processor(images=pils, return_tensors="pt")
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])


def test_tensor_path_without_resize_scores_like_the_exact_path(kwargs) -> None:
    at_size = hpsv3.load(**kwargs, min_pixels=56 * 84, max_pixels=56 * 84)  # a 56x84 image needs no resize
    pils = random_pil_images([(56, 84), (56, 84)], seed=5)
    exact = at_size.score_pil(pils, PROMPTS[:2])
    torch.testing.assert_close(at_size(_as_tensor(pils), PROMPTS[:2]), exact, rtol=0, atol=RTOL * exact.abs().max())
    batch = at_size.text_inputs(PROMPTS[:2], at_size.pixel_inputs(_as_tensor(pils))["image_grid_thw"])
    texts = at_size._texts(PROMPTS[:2])
    processed = at_size.processor(text=texts, images=pils, padding=True, padding_side="right", return_tensors="pt")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        assert torch.equal(batch[key], processed[key].long()), key


def test_tensor_path_gap_with_resize_is_small(reward) -> None:
    pils = random_pil_images([(200, 300), (200, 300)], seed=11)
    gap = (reward(_as_tensor(pils), PROMPTS[:2]) - reward.score_pil(pils, PROMPTS[:2])).abs().max()
    assert 0 < gap < 3e-3  # measured 1.0e-3 (score spread ~0.35): PIL's uint8 rounding, skipped by the tensor path


def test_gradient_reaches_the_pixels(reward) -> None:
    pixels = _as_tensor(random_pil_images([(48, 40)], seed=3)).requires_grad_(True)
    reward(pixels, "a cat").sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())


def test_batched_chunked_and_single_rows_agree(kwargs, reward) -> None:
    images = rkt.random_images(3, 48, 40, seed=2)
    whole = reward(images, PROMPTS)
    chunked = hpsv3.load(**kwargs, batch_size=2)(images, PROMPTS)
    singles = torch.cat([reward(images[i : i + 1], PROMPTS[i]) for i in range(3)])
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(singles, whole, rtol=0, atol=1e-6)
    prompt_moves = reward(images[:1].expand(2, -1, -1, -1), ["a cat", "a rusty tractor in the snow"])
    assert (prompt_moves[0] - prompt_moves[1]).abs() > 1e-4


def test_bf16_trunk_keeps_an_fp32_head_and_stays_close(kwargs, reward) -> None:
    fast = rk.load("hpsv3", dtype="bf16", **kwargs)
    assert fast.net.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in fast.net.rm_head.parameters())
    assert fast.net.model.language_model.rotary_emb.inv_freq.dtype == torch.float32
    images = rkt.random_images(3, 48, 40, seed=2)
    exact, scores = reward(images, PROMPTS), fast(images, PROMPTS)
    assert scores.dtype == torch.float32
    assert (scores - exact).abs().max() <= 0.1 * (exact.max() - exact.min())


def test_bad_inputs_raise_with_a_fix(reward) -> None:
    images = rkt.random_images(2, 48, 40)
    with pytest.raises(ValueError, match=r"contains the special token.*<\|Reward\|>"):
        reward(images, "a cat <|Reward|>")
    with pytest.raises(ValueError, match="image_pad"):
        reward.score_pil(random_pil_images([(48, 40)]), "a <|image_pad|> cat")
    with pytest.raises(ValueError, match="one prompt or 2 prompts"):
        reward(images, PROMPTS)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        reward(images * 255, "a cat")
    with pytest.raises(ValueError, match="NHWC"):
        reward(images.permute(0, 2, 3, 1), "a cat")
    with pytest.raises(ValueError, match="aspect ratio"):
        reward(torch.rand(1, 3, 1, 300), "a cat")


def test_strict_loading_names_the_problem(tmp_path, kwargs) -> None:
    from safetensors.torch import save_file

    state = read_state_dict(kwargs["weights"])
    assert "lm_head.weight" in state and not any(k.startswith("lm_head") for k in hpsv3_key_map(state))
    broken = {k: v for k, v in state.items() if k != "model.norm.weight"}
    broken["rm_head.9.weight"] = torch.zeros(1)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"model\.language_model\.norm\.weight.*rm_head\.9\.weight"):
        hpsv3.load(weights=str(tmp_path / "broken.safetensors"), processor=kwargs["processor"], config=kwargs["config"])
    save_file({k: v for k, v in state.items() if not k.startswith("rm_head.")}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an HPSv3 checkpoint"):
        hpsv3.load(weights=str(tmp_path / "plain.safetensors"), processor=kwargs["processor"], config=kwargs["config"])
    with pytest.raises(CheckpointMismatchError, match="shape conflicts"):  # the 7B default config
        hpsv3.load(weights=kwargs["weights"], processor=kwargs["processor"],
                   config={**kwargs["config"], "text_config": {**kwargs["config"]["text_config"], "hidden_size": 32}})


def test_default_architecture_is_hpsv3_7b() -> None:
    config = hpsv3_qwen2vl_config()
    with torch.device("meta"):
        net = HPSv3Net(config)
    params = sum(p.numel() for p in net.parameters())
    assert config.text_config.vocab_size == 151658 and 7.7e9 < params < 7.8e9  # 8.29 B minus the 0.54 B lm_head
    assert tuple(net.rm_head[5].weight.shape) == (2, 16)


def test_pickles_with_its_processor(reward) -> None:
    images = rkt.random_images(1, 48, 40, seed=4)
    clone = pickle.loads(pickle.dumps(reward))
    torch.testing.assert_close(clone(images, "a cat"), reward(images, "a cat"), rtol=0, atol=1e-6)
