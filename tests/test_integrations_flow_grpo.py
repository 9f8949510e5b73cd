"""flow_grpo's reward contract, called the way ``yifan123/flow_grpo`` calls ``multi_score``'s function.

Call pattern reproduced from ``scripts/train_sd3.py`` (ac4c86e): ``executor = ThreadPoolExecutor(max_workers=8)``;
per sampling batch ``executor.submit(reward_fn, images, prompts, prompt_metadata, only_strict=True)`` then
``time.sleep(0)``; after sampling ``rewards, reward_metadata = future.result()`` and
``{key: torch.as_tensor(value).float()}``, ``torch.cat`` over batches, advantages from ``"avg"``.

Scales are checked against flow_grpo's formulas (``flow_grpo/rewards.py`` 94e23ee and the scorer files) applied
to independently computed inputs: the test quantises images itself, builds clipscore's transform from the
checkpoint's processor config with torchvision and reads ``logits_per_image`` from transformers' CLIPModel, as
``flow_grpo/clip_scorer.py`` does, and preprocesses aesthetic's input with transformers' PIL CLIP processor.
"""

from __future__ import annotations

import io
import math
import pickle
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.integrations.flow_grpo import as_flow_grpo_reward, multi_score

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

PROMPTS = ['a sign that says "hello"', 'a cat holding "OK"', "a bowl of fruit", 'the word "rl"']
METADATA = [{}, {}, {}, {}]
MODEL_NAMES = {"pickscore": "pickscore", "clipscore": "clip-score", "aesthetic": "aesthetic",
               "imagereward": "imagereward", "hpsv2_score": "hpsv2.1"}


@pytest.fixture(scope="module")
def models(tiny_reward):
    return {name: tiny_reward(registry) for name, registry in MODEL_NAMES.items()}


def _quantised(images: torch.Tensor) -> np.ndarray:
    """flow_grpo rewards.py: (images * 255).round().clamp(0, 255).to(torch.uint8), NCHW -> NHWC."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy().transpose(0, 2, 3, 1)


def _jpeg_compressibility(arrays: np.ndarray) -> np.ndarray:
    """flow_grpo rewards.py jpeg_incompressibility / jpeg_compressibility: -(bytes / 1000) / 500 at quality 95."""
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return -np.array(sizes) / 500


def _clipscore_reference(folder: str, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """flow_grpo/clip_scorer.py on transformers' CLIPModel: T.Resize / CenterCrop / Normalize from the processor
    config, texts padded to max_length, ``logits_per_image.diagonal() / 30``."""
    import torchvision.transforms as T
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(folder)
    config = processor.image_processor.to_dict()
    size, crop = config["size"], config["crop_size"]
    transform = T.Compose([T.Resize(size["shortest_edge"]), T.CenterCrop((crop["height"], crop["width"])),
                           T.Normalize(mean=processor.image_processor.image_mean, std=processor.image_processor.image_std)])
    model = CLIPModel.from_pretrained(folder).eval()
    texts = processor(text=prompts, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(pixel_values=transform(images), **texts).logits_per_image.diagonal() / 30


def test_train_sd3_call_pattern_eight_threads(models) -> None:
    score_dict = {"pickscore": 1.0, "jpeg_compressibility": 0.5}
    reward_fn = as_flow_grpo_reward(score_dict, models=models)
    batches = [rkt.random_images(4, 32, 32, seed=s) for s in range(3)]
    executor = ThreadPoolExecutor(max_workers=8)  # train_sd3.py
    samples = []
    for images in batches:
        rewards = executor.submit(reward_fn, images, PROMPTS, METADATA, only_strict=True)
        time.sleep(0)
        samples.append({"rewards": rewards})
    for sample in samples:
        rewards, reward_metadata = sample["rewards"].result()
        sample["rewards"] = {key: torch.as_tensor(value, device="cpu").float() for key, value in rewards.items()}
        assert reward_metadata == {}
    executor.shutdown()
    gathered = {key: torch.cat([s["rewards"][key] for s in samples]).numpy() for key in samples[0]["rewards"]}
    assert list(gathered) == ["pickscore", "jpeg_compressibility", "avg"]
    assert all(v.shape == (12,) and np.isfinite(v).all() for v in gathered.values())
    np.testing.assert_allclose(gathered["avg"], gathered["pickscore"] + 0.5 * gathered["jpeg_compressibility"],
                               rtol=1e-6)
    # Results do not depend on threads: equal to one call at a time.
    sequential = np.concatenate([reward_fn(images, PROMPTS, METADATA)[0]["avg"] for images in batches])
    np.testing.assert_array_equal(np.float32(sequential), gathered["avg"])
    # flow_grpo's batch z-score (per_prompt_stat_tracking off) on "avg" is finite.
    advantages = (gathered["avg"] - gathered["avg"].mean()) / (gathered["avg"].std() + 1e-4)
    assert np.isfinite(advantages).all()


def test_scales_equal_flow_grpo_formulas(models, tiny_root) -> None:
    from transformers import CLIPImageProcessorPil

    images = rkt.random_images(4, 49, 40, seed=5)  # resized to 39 x 32: floor and round crops differ by a pixel
    arrays = _quantised(images)
    pils = [Image.fromarray(a) for a in arrays]
    names = ["pickscore", "clipscore", "aesthetic", "imagereward", "hpsv2_score", "jpeg_compressibility"]
    weights = dict(zip(names, [1.0, 0.5, 0.25, 2.0, -1.0, 3.0]))
    scores, info = as_flow_grpo_reward(weights, models=models)(images, PROMPTS, METADATA)
    assert info == {} and list(scores) == names + ["avg"]
    assert all(isinstance(v, list) and len(v) == 4 and all(type(x) is float for x in v) for v in scores.values())
    with torch.no_grad():
        expected = {
            # pickscore_scorer.py: logit_scale.exp() * cos / 26 (rewardkit's pickscore is logit_scale.exp() * cos)
            "pickscore": models["pickscore"].evaluate_pil(pils, PROMPTS).scores / 26,
            "clipscore": _clipscore_reference(str(tiny_root / "upstream" / "clip-score" / "clip-score"), images, PROMPTS),
            # aesthetic_scorer.py: CLIPProcessor (transformers 4.x = CLIPImageProcessorPil) -> CLIP -> MLP
            "aesthetic": models["aesthetic"].score_pixels(CLIPImageProcessorPil.from_pretrained(
                str(tiny_root / "upstream" / "aesthetic" / "clip-vit-l-14"))(images=pils, return_tensors="pt")
                ["pixel_values"], None).scores,
            "imagereward": models["imagereward"].evaluate_pil(pils, PROMPTS).scores,  # inference_rank = score
            "hpsv2_score": models["hpsv2_score"].evaluate_pil(pils, PROMPTS).scores,  # raw cosine, v2.1
            "jpeg_compressibility": torch.as_tensor(_jpeg_compressibility(arrays)),
        }
    for name in names:
        np.testing.assert_allclose(scores[name], expected[name].double().numpy(), rtol=2e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(scores["avg"], sum(w * np.array(scores[n]) for n, w in weights.items()), rtol=1e-12)


def test_numpy_nhwc_and_pil_inputs_score_like_tensors(models) -> None:
    # Already-quantised tensors: all three forms carry the same uint8 pixels, so every reward agrees exactly.
    images = torch.as_tensor(_quantised(rkt.random_images(3, 36, 36, seed=2))).permute(0, 3, 1, 2).float() / 255
    fn = as_flow_grpo_reward({"pickscore": 1.0, "clipscore": 1.0, "aesthetic": 1.0, "jpeg_compressibility": 1.0},
                             models=models)
    from_tensor = fn(images, PROMPTS[:3], METADATA[:3])[0]
    arrays = _quantised(images)
    assert fn(arrays, PROMPTS[:3], METADATA[:3])[0] == from_tensor
    assert fn([Image.fromarray(a) for a in arrays], tuple(PROMPTS[:3]), METADATA[:3])[0] == from_tensor
    # PIL images of different sizes are scored each at its own size.
    mixed = [Image.fromarray(arrays[0]), Image.fromarray(arrays[1][:20, :30])]
    scores = fn(mixed, PROMPTS[:2], METADATA[:2])[0]
    assert scores["pickscore"][0] == pytest.approx(from_tensor["pickscore"][0], rel=1e-6)
    assert math.isfinite(scores["clipscore"][1])


def test_ocr_scale_and_nan_policy(tiny_reward) -> None:
    ocr = tiny_reward("ocr")
    images = rkt.random_images(3, 32, 64, seed=1)
    prompts = ['a sign "hi"', "no quoted text here", 'say "ok"']
    pils = [Image.fromarray(a) for a in _quantised(images)]
    with pytest.raises(ValueError, match=r"rows \[1\].*ocr.*double-quoted.*nan_value"):
        as_flow_grpo_reward({"ocr": 1.0}, models={"ocr": ocr})(images, prompts, METADATA[:3])
    scores, info = as_flow_grpo_reward({"ocr": 2.0}, models={"ocr": ocr}, nan_value=0.0)(images, prompts, METADATA[:3])
    expected = ocr.evaluate_pil(pils, prompts).scores.tolist()  # flow_grpo ocr.py's formula, unscaled
    assert math.isnan(scores["ocr"][1]) and math.isnan(expected[1])
    assert [scores["ocr"][i] for i in (0, 2)] == pytest.approx([expected[i] for i in (0, 2)])
    assert scores["avg"] == pytest.approx([2 * expected[0], 0.0, 2 * expected[2]])
    assert list(info["failures"]["ocr"]) == [1] and "double-quoted" in info["failures"]["ocr"][1]


def test_rewardkit_reward_and_composition(models) -> None:
    images = rkt.random_images(4, 32, 32, seed=3)
    composed = rk.compose({models["pickscore"]: 1.0, "jpeg-compressibility": 0.01})
    scores, info = as_flow_grpo_reward(composed)(images, PROMPTS, METADATA)
    expected = composed.evaluate(images, PROMPTS)
    assert {"pickscore", "jpeg-compressibility", "composed", "avg"} <= set(scores) and info == {}
    np.testing.assert_allclose(scores["avg"], expected.scores.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(scores["pickscore"], expected.details["pickscore"].double().numpy(), rtol=1e-6)
    jpeg_only = as_flow_grpo_reward(rk.load("jpeg-compressibility"))(images, PROMPTS, METADATA)[0]
    assert list(jpeg_only) == ["size_kb", "jpeg-compressibility", "avg"]  # rewardkit's own scale (-kB) here


def test_multi_score_signature_and_pickling() -> None:
    images = rkt.random_images(2, 32, 32)
    fn = multi_score(torch.device("cpu"), {"jpeg_compressibility": 1.0})
    clone = pickle.loads(pickle.dumps(fn))
    assert clone(images, PROMPTS[:2], METADATA[:2]) == fn(images, PROMPTS[:2], METADATA[:2])
    np.testing.assert_allclose(fn(images, PROMPTS[:2], METADATA[:2])[0]["avg"], _jpeg_compressibility(_quantised(images)),
                               rtol=1e-6)


def test_refusals_name_what_is_supported() -> None:
    with pytest.raises(ValueError, match=r"'unifiedreward' is not supported.*unified-reward-2.*Supported: \["):
        as_flow_grpo_reward({"unifiedreward": 1.0})
    with pytest.raises(ValueError, match=r"unknown flow_grpo reward 'hpsv2'.*hpsv2_score.*supported"):
        as_flow_grpo_reward({"hpsv2": 1.0})
    for name in ("deqa", "qwenvl", "video_ocr", "image_similarity"):
        with pytest.raises(ValueError, match=f"'{name}' is not supported"):
            as_flow_grpo_reward({name: 1.0})
    with pytest.raises(TypeError, match="flow_grpo reward names"):
        as_flow_grpo_reward({rk.load("jpeg-compressibility"): 1.0})
    with pytest.raises(TypeError, match="score_dict"):
        as_flow_grpo_reward("pickscore")
    with pytest.raises(ValueError, match="'pickscore' must be a finite number, got 'x'"):
        as_flow_grpo_reward({"pickscore": "x"})  # refused before any model loads (no weights here)
    with pytest.raises(ValueError, match="unknown flow_grpo reward 'nope'"):
        as_flow_grpo_reward({"pickscore": 1.0, "nope": 1.0})
    with pytest.raises(ValueError, match="empty score_dict"):
        as_flow_grpo_reward({})
    with pytest.raises(ValueError, match="nan_value"):
        as_flow_grpo_reward({"jpeg_compressibility": 1.0}, nan_value=float("nan"))
    with pytest.raises(ValueError, match=r"convention='ddpo'.*convention='flow_grpo'"):  # -kB would pass silently
        as_flow_grpo_reward({"jpeg_compressibility": 1.0}, models={"jpeg_compressibility": rk.load("jpeg-compressibility")})
    prebuilt = rk.load("jpeg-compressibility", scale=1 / 500)
    assert as_flow_grpo_reward({"jpeg_compressibility": 1.0}, models={"jpeg_compressibility": prebuilt}).members[
        "jpeg_compressibility"] is prebuilt


def test_bad_inputs_raise_before_scoring(models) -> None:
    fn = as_flow_grpo_reward({"jpeg_compressibility": 1.0})
    images = rkt.random_images(2, 16, 16)
    with pytest.raises(ValueError, match=r"\[0, 1\].*images / 255"):
        fn(images * 255, PROMPTS[:2], METADATA[:2])
    with pytest.raises(ValueError, match="uint8 \\(B, H, W, 3\\)"):
        fn(images.permute(0, 2, 3, 1).numpy(), PROMPTS[:2], METADATA[:2])
    with pytest.raises(ValueError, match="uint8 \\(B, H, W, 3\\)"):
        fn(_quantised(images).transpose(0, 3, 1, 2), PROMPTS[:2], METADATA[:2])
    with pytest.raises(ValueError, match="2 prompts"):
        fn(images, PROMPTS[:3], METADATA[:3])
    assert fn(images, None, METADATA[:2])[0]["avg"] == fn(images, PROMPTS[:2], METADATA[:2])[0]["avg"]  # prompt-free
    with pytest.raises(ValueError, match="prompt"):
        as_flow_grpo_reward({"jpeg_compressibility": 1.0, "pickscore": 1.0}, models=models)(images, None, [{}, {}])
    with pytest.raises(ValueError, match="ref_images"):
        fn(images, PROMPTS[:2], METADATA[:2], ref_images=images)
    with pytest.raises(TypeError, match="non-empty list of PIL"):
        fn([], [], [])


def test_geneval_keys_and_values_follow_flow_grpo(tmp_path_factory) -> None:
    from rewardkit.rewards.geneval import GenEvalReward
    from rewardkit.rewards.geneval_rules import TAGS

    geneval = rkt.load_tiny("geneval", tmp_path_factory.mktemp("geneval"), jpeg_quality=75)
    images = rkt.random_images(3, 64, 80, seed=3)
    metadata = ({"tag": "single_object", "include": [{"class": "cat", "count": 1}]},
                {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]},
                {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]})
    fn = as_flow_grpo_reward({"geneval": 2.0}, models={"geneval": geneval})
    scores, info = fn(images, ["p"] * 3, metadata, only_strict=True)
    # flow_grpo's client sends Pillow-default JPEGs (quality 75) of the uint8 images; the server scores the decoded
    # images (reward-server gen_eval.py): rebuild that here and score it with the reward's rules, no round trip.
    decoded = []
    for array in _quantised(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG")
        decoded.append(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    plain = GenEvalReward(geneval.detector, geneval.colors).evaluate_pil(decoded, metadata=list(metadata)).details
    tags = [m["tag"] for m in metadata]
    expected = {"accuracy": plain["correct"].tolist(), "strict_accuracy": plain["strict"].tolist()}
    for suffix, key in (("strict_accuracy", "strict"), ("accuracy", "correct")):
        for tag in TAGS:  # compute_geneval: -10.0 for rows of other tags
            expected[f"{tag}_{suffix}"] = [plain[key][i].item() if t == tag else -10.0 for i, t in enumerate(tags)]
    expected["geneval"] = plain["partial"].tolist()
    expected["avg"] = [2.0 * v for v in expected["geneval"]]
    assert list(scores) == list(expected) and info == {}
    for key, values in expected.items():
        assert scores[key] == pytest.approx(values, abs=1e-6), key
    with pytest.raises(ValueError, match=r"rows \[1\].*no GenEval metadata"):
        fn(images, ["p"] * 3, (metadata[0], None, metadata[2]))
