"""The ``geneval`` reward end to end on tiny random models (Mask2Former HF folder + open_clip colour CLIP):
post-processing against mmdet's formula, the colour classifier against clip_benchmark's, the reward against
the rules applied to its own detections, metadata handling and options."""

from __future__ import annotations

import json
import math
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.rewards.geneval import GenEvalReward
from rewardkit.rewards.geneval_colors import CROP_BACKGROUND, color_templates
from rewardkit.rewards.geneval_rules import COLORS, GENEVAL_CLASSES, Detection, evaluate_geneval, evaluate_partial, \
    select_detections
from rewardkit.vlm.judge import tensor_to_pil

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def reward(tmp_path_factory):
    return rk.load("geneval", **rkt.tiny_geneval(tmp_path_factory.mktemp("geneval")))


@pytest.fixture(scope="module")
def images():
    return rkt.random_images(3, 64, 80, seed=3)


def _single(name: str) -> dict:
    return {"tag": "single_object", "include": [{"class": name, "count": 1}], "prompt": f"a photo of a {name}"}


def test_mask2former_postprocess_follows_mmdet(reward, images) -> None:
    """mmdet ``MaskFormerFusionHead.instance_postprocess`` rewritten here: softmax without "no object", top-100
    (query, class) pairs, masks upsampled bilinearly to the image, score x mean mask probability, mask2bbox."""
    detector = reward.detector
    pil = tensor_to_pil(images[:1])
    inputs = detector.processor(images=pil, return_tensors="pt")
    with torch.no_grad():
        out = detector.model(**inputs)
    h, w = inputs["pixel_mask"][0].any(1).sum().item(), inputs["pixel_mask"][0].any(0).sum().item()
    probs = out.class_queries_logits[0].softmax(-1)[:, :-1]
    scores, index = probs.flatten().topk(min(100, probs.numel()))
    masks = torch.nn.functional.interpolate(out.masks_queries_logits, size=inputs["pixel_values"].shape[-2:],
                                            mode="bilinear", align_corners=False)[:, :, :h, :w]
    masks = torch.nn.functional.interpolate(masks, size=(64, 80), mode="bilinear", align_corners=False)[0]
    expected = {}
    for score, i in zip(scores.tolist(), index.tolist()):
        logit = masks[i // 80]
        binary = logit > 0
        final = score * ((logit.sigmoid() * binary).sum() / (binary.sum() + 1e-6)).item()
        ys, xs = torch.nonzero(binary.any(1)).flatten(), torch.nonzero(binary.any(0)).flatten()
        box = (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)) if len(xs) else (0.0,) * 4
        expected.setdefault(GENEVAL_CLASSES[i % 80], []).append((round(final, 5), box))
    found = detector.detect(pil)[0]
    ours = {name: sorted((round(d.score, 5), d.box) for d in ds) for name, ds in found.items()}
    assert ours == {name: sorted(v) for name, v in expected.items()}
    assert any(d.score > 0.3 for ds in found.values() for d in ds), "the tiny head must produce detections"
    assert all(d.mask.shape == (64, 80) and d.mask.dtype == bool for ds in found.values() for d in ds)


def test_colour_classifier_follows_clip_benchmark(reward, images) -> None:
    colors = reward.colors
    image = tensor_to_pil(images[:1])[0]
    mask = np.zeros((64, 80), bool)
    mask[10:40, 20:60] = True
    objects = [Detection((20.0, 10.0, 60.0, 40.0), 0.9, mask), Detection((0.0, 0.0, 30.0, 30.0), 0.8, None)]
    crop = colors.crops(image, objects)[0]
    assert crop.size == (40, 30) and crop.getpixel((0, 0)) == image.getpixel((20, 10))
    wide = Detection((10.0, 5.0, 70.0, 50.0), 0.9, mask)
    assert colors.crops(image, [wide])[0].getpixel((0, 0)) == Image.new("RGB", (1, 1), CROP_BACKGROUND).getpixel((0, 0))
    # clip_benchmark zero_shot_classifier: per colour, mean of normalised template embeddings, renormalised
    towers = colors.towers
    with torch.no_grad():
        columns = []
        for colour in COLORS:
            e = towers.encode_text([t.format(c=colour) for t in color_templates("cat")])
            e = torch.nn.functional.normalize(e, dim=-1).mean(0)
            columns.append(e / e.norm())
        classifier = torch.stack(columns, 1)
        from rewardkit.preprocess import preprocess_pil

        feats = torch.nn.functional.normalize(towers.encode_image(preprocess_pil(colors.crops(image, objects), colors.spec)), dim=-1)
    torch.testing.assert_close(colors.classifier("cat"), classifier)
    assert colors(image, "cat", objects) == [COLORS[i] for i in (100.0 * feats @ classifier).argmax(1).tolist()]
    assert color_templates("cat") == ["a photo of a {c} cat", "a photo of a {c}-colored cat", "a photo of a {c} object"]


def test_reward_equals_the_rules_on_its_own_detections(reward, images) -> None:
    pil = tensor_to_pil(images)
    found = reward.detector.detect(pil)
    kept = [select_detections(f, "single_object") for f in found]
    present = next(iter(kept[0]))  # a class the tiny detector reports in image 0
    metadata = [_single(present),
                {"tag": "color_attr", "include": [{"class": present, "count": 1, "color": "red"},
                                                  {"class": "cat", "count": 1, "color": "blue"}]},
                {"tag": "counting", "include": [{"class": present, "count": 2}],
                 "exclude": [{"class": present, "count": 3}]}]
    out = reward.evaluate(images, metadata=metadata)
    for i, meta in enumerate(metadata):
        objects = select_detections(found[i], meta["tag"])
        classify = lambda name, objs, i=i: reward.colors(pil[i], name, objs)  # noqa: E731
        correct, _ = evaluate_geneval(objects, meta, classify)
        strict, partial, _ = evaluate_partial(objects, meta, classify)
        assert (out.details["correct"][i].item(), out.details["strict"][i].item()) == (float(correct), float(strict))
        assert out.details["partial"][i].item() == pytest.approx(partial, abs=1e-6)
        assert json.loads(out.details["raw"][i]).keys() == objects.keys()
    assert out.details["correct"][0] == 1.0  # the detected class is found
    torch.testing.assert_close(out.scores, out.details["partial"])
    assert out.details["failure"] == [None] * 3 and out.details["tag"] == ["single_object", "color_attr", "counting"]


def test_rows_without_metadata_are_nan_and_scores_selectable(reward, images, tmp_path) -> None:
    out = reward.evaluate(images, metadata=[_single("cat"), None, _single("dog")])
    assert math.isnan(out.scores[1]) and "no GenEval metadata" in out.details["failure"][1]
    assert torch.isfinite(out.scores[[0, 2]]).all()
    strict = GenEvalReward(reward.detector, reward.colors, score="correct")
    torch.testing.assert_close(strict.evaluate(images, metadata=_single("cat")).scores,
                               reward.evaluate(images, metadata=_single("cat")).details["correct"])
    one_by_one = torch.cat([reward(images[i:i + 1], metadata=[_single("dog")]) for i in range(3)])
    torch.testing.assert_close(reward(images, metadata=_single("dog")), one_by_one)
    clone = pickle.loads(pickle.dumps(reward))
    torch.testing.assert_close(clone(images, metadata=_single("dog")), one_by_one)


def test_jpeg_round_trip_option_and_pil_path(reward, images) -> None:
    jpeg = GenEvalReward(reward.detector, reward.colors, jpeg_quality=75)
    pil = tensor_to_pil(images)
    assert jpeg.evaluate_pil(pil, metadata=_single("cat")).scores.shape == (3,)
    torch.testing.assert_close(reward.evaluate_pil(pil, metadata=_single("cat")).scores,
                               reward.evaluate(images, metadata=_single("cat")).scores)


def test_bad_arguments_name_the_fix(reward, images) -> None:
    with pytest.raises(ValueError, match="one dict or a list of 3"):
        reward(images, metadata=[_single("cat")])
    with pytest.raises(ValueError, match=r"metadata\[0\].*'tag' and 'include'"):
        reward(images, metadata=[{"prompt": "a cat"}] * 3)
    with pytest.raises(ValueError, match="score must be one of"):
        GenEvalReward(reward.detector, reward.colors, score="soft")
    with pytest.raises(ValueError, match="detector must be one of"):
        rk.load("geneval", detector="yolo")
    with pytest.raises(ValueError, match="mmdet_config="):
        rk.load("geneval", detector="mmdet")
    with pytest.raises(TypeError, match="unexpected keyword"):
        reward(images, metadata=_single("cat"), source=images)


def test_mmdet_detector_says_what_to_install(tmp_path, monkeypatch) -> None:
    from rewardkit.rewards.geneval_detectors import MmdetDetector

    # mmdet made unimportable (a None entry in sys.modules), so the message is checked where mmdet is installed too.
    monkeypatch.setitem(sys.modules, "mmdet", None)
    monkeypatch.setitem(sys.modules, "mmdet.apis", None)
    with pytest.raises(ImportError, match="mmdet 2.x"):
        MmdetDetector(str(tmp_path / "c.py"), str(tmp_path / "w.pth"))


def test_a_detector_with_the_wrong_classes_is_refused(tmp_path) -> None:
    from transformers import Mask2FormerConfig

    kwargs = rkt.tiny_geneval(tmp_path)
    config = Mask2FormerConfig.from_pretrained(kwargs["weights"])
    config.num_labels = 3
    config.id2label = {0: "a", 1: "b", 2: "c"}
    config.label2id = {"a": 0, "b": 1, "c": 2}
    config.save_pretrained(kwargs["weights"])
    with pytest.raises(ValueError, match="has 3 classes; GenEval needs a COCO instance model with the 80"):
        rk.load("geneval", **kwargs)


def test_composes_with_metadata_passed_through(reward, images, tiny_root) -> None:
    ocr = rkt.load_tiny("ocr", tiny_root / "geneval-compose")
    metadata = [_single("cat"), _single("dog"), _single("spoon")]
    total = rk.compose({reward: 1.0, ocr: 0.5})
    out = total.evaluate(images, ['a sign "hi"'] * 3, metadata=metadata)
    torch.testing.assert_close(out.details["geneval"], reward(images, metadata=metadata))
    torch.testing.assert_close(out.scores, out.details["geneval"] + 0.5 * out.details["ocr"])


def test_mmdet_detector_reads_mmdet_2x_results(monkeypatch) -> None:
    """GenEval's own path: ``init_detector`` + ``inference_detector`` of mmdet 2.x, whose result for a
    Mask2Former is ``(bbox_results, segm_results)``: per COCO class (mmdet's order) an ``(n, 5)`` array of
    ``[x1, y1, x2, y2, score]`` and a list of ``n`` (H, W) masks (mmdet/apis/inference.py,
    mmdet/models/detectors/maskformer.py in mmdet 2.x). mmdet does not install beside current torch, so its two
    API functions are stood in for here; the adapter's reading of their documented output is what is tested."""
    import sys
    import types

    import numpy as np
    from PIL import Image

    from rewardkit.rewards.geneval_detectors import MmdetDetector
    from rewardkit.rewards.geneval_rules import GENEVAL_CLASSES

    seen = {}

    def init_detector(config, checkpoint, device):
        seen["init"] = (config, checkpoint, device)
        return "model"

    def inference_detector(model, image):
        seen["image"] = image
        bbox = [np.zeros((0, 5), dtype=np.float32) for _ in GENEVAL_CLASSES]
        segm = [[] for _ in GENEVAL_CLASSES]
        dog = GENEVAL_CLASSES.index("dog")
        bbox[dog] = np.array([[1, 2, 5, 6, 0.9], [0, 0, 3, 3, 0.2]], dtype=np.float32)
        segm[dog] = [np.ones((8, 8), dtype=bool), np.zeros((8, 8), dtype=bool)]
        return bbox, segm

    apis = types.ModuleType("mmdet.apis")
    apis.init_detector, apis.inference_detector = init_detector, inference_detector
    monkeypatch.setitem(sys.modules, "mmdet", types.ModuleType("mmdet"))
    monkeypatch.setitem(sys.modules, "mmdet.apis", apis)

    detector = MmdetDetector("mask2former.py", "mask2former.pth", device="cpu")
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[..., 0] = 200  # red in RGB: mmdet reads ndarrays as BGR, so it must arrive in the last channel
    (found,) = detector.detect([Image.fromarray(pixels)])
    assert seen["init"] == ("mask2former.py", "mask2former.pth", "cpu")
    assert seen["image"][0, 0].tolist() == [0, 0, 200]
    assert list(found) == ["dog"] and len(found["dog"]) == 2
    first, second = found["dog"]
    assert first.box == (1.0, 2.0, 5.0, 6.0) and first.score == pytest.approx(0.9) and first.mask.all()
    assert second.score == pytest.approx(0.2) and not second.mask.any()
