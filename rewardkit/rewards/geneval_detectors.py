"""Object detectors behind ``geneval``: Mask2Former through ``transformers`` (default) or GenEval's mmdet config.

Each detector has ``detect(images) -> list[dict[class name, list[Detection]]]`` for RGB PIL images, every
detection with a box ``(x1, y1, x2, y2)`` in the image's pixels, a confidence and a boolean mask ``(H, W)``,
classes named as GenEval names them (``geneval_rules.GENEVAL_CLASSES``, COCO's 80 in mmdet's order).

``Mask2FormerDetector`` runs ``Mask2FormerForUniversalSegmentation`` and post-processes its outputs the way
mmdet's ``MaskFormerFusionHead.instance_postprocess`` does (what GenEval's ``inference_detector`` returns):
softmax over the classes without "no object", the top ``max_per_image`` (query, class) pairs, masks from the
mask logits upsampled bilinearly to the image (> 0), score = class probability x mean mask probability inside
the mask, box = the mask's extent (``mask2bbox``: last pixel + 1). Its input resize and normalisation are the
checkpoint's ``Mask2FormerImageProcessor`` (for ``facebook/mask2former-swin-small-coco-instance``: shortest
side 384), not mmdet's test pipeline (1333 x 800 keep-ratio resize): a stated fidelity gap (docs/geneval.md).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from rewardkit.rewards.geneval_rules import GENEVAL_CLASSES, Detection

__all__ = ["Mask2FormerDetector", "MmdetDetector", "DEFAULT_DETECTOR", "MAX_PER_IMAGE", "MMDET_CONFIG"]

DEFAULT_DETECTOR = "hf:facebook/mask2former-swin-small-coco-instance"  # Swin-S COCO instance, as GenEval's mmdet model
MAX_PER_IMAGE = 100  # mmdet mask2former_*_coco.py test_cfg max_per_image
MMDET_CONFIG = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"  # evaluate_images.py default detector
_HF_PATTERNS = ["*.json", "*.safetensors", "*.bin"]


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """mmdet ``mask2bbox``: ``(N, H, W)`` bool -> ``(N, 4)`` ``[x_min, y_min, x_max + 1, y_max + 1]``, 0 if empty."""
    boxes = torch.zeros(masks.shape[0], 4, dtype=torch.float32)
    x_any, y_any = masks.any(dim=1), masks.any(dim=2)
    for i in range(masks.shape[0]):
        xs, ys = torch.nonzero(x_any[i]).flatten(), torch.nonzero(y_any[i]).flatten()
        if len(xs) and len(ys):
            boxes[i] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    return boxes


class Mask2FormerDetector:
    """Mask2Former instance segmentation from a Hugging Face folder (COCO's 80 classes in order).

    Args:
        weights: a local folder or ``"hf:owner/repo"`` with ``config.json``, the weights and
            ``preprocessor_config.json``; ``None`` = :data:`DEFAULT_DETECTOR`.
        device: where the model runs.
        min_score: detections at or below this score are dropped early (GenEval's lowest threshold is 0.3; the
            rules threshold again, so any value <= the thresholds in use gives the same verdicts).
    """

    def __init__(self, weights: Any = None, device: Any = None, min_score: float = 0.0) -> None:
        from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        from rewardkit.weights import resolve_weights

        path = resolve_weights(weights or DEFAULT_DETECTOR, allow_patterns=_HF_PATTERNS, what="geneval detector")
        self.path = path
        labels = Mask2FormerConfig.from_pretrained(str(path)).num_labels  # checked before the weights are read
        if labels != len(GENEVAL_CLASSES):
            raise ValueError(f"geneval: the detector at {path} has {labels} classes; GenEval needs a COCO instance "
                             f"model with the {len(GENEVAL_CLASSES)} COCO classes in mmdet's order")
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(str(path)).eval().requires_grad_(False)
        self.processor = Mask2FormerImageProcessor.from_pretrained(str(path))
        self.device = torch.device(device or "cpu")
        self.model.to(self.device)
        self.min_score = float(min_score)

    def __getstate__(self) -> dict[str, Any]:
        # transformers installs unpicklable forward hooks on the model: pickle the recipe, reload on unpickling
        return {"path": str(self.path), "device": str(self.device), "min_score": self.min_score}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["device"], state["min_score"])

    def detect(self, images: Sequence[Any]) -> list[dict[str, list[Detection]]]:
        """Detect objects in RGB PIL images (any sizes; one forward per call, padded by the processor)."""
        inputs = self.processor(images=list(images), return_tensors="pt")
        with torch.inference_mode():
            outputs = self.model(pixel_values=inputs["pixel_values"].to(self.device),
                                 pixel_mask=inputs["pixel_mask"].to(self.device))
        results = []
        for i, image in enumerate(images):
            valid = inputs["pixel_mask"][i]
            size = (int(valid.any(1).sum()), int(valid.any(0).sum()))  # the resized image inside the padding
            results.append(self._one(outputs.class_queries_logits[i].float(), outputs.masks_queries_logits[i].float(),
                                     inputs["pixel_values"].shape[-2:], size, (image.height, image.width)))
        return results

    def _one(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, padded: Any, valid: tuple[int, int],
             original: tuple[int, int]) -> dict[str, list[Detection]]:
        num_classes = class_logits.shape[1] - 1
        scores = torch.softmax(class_logits, dim=-1)[:, :-1]  # drop "no object"
        top = min(MAX_PER_IMAGE, scores.numel())
        top_scores, top_index = scores.flatten().topk(top, sorted=False)
        labels, queries = top_index % num_classes, top_index // num_classes
        # mmdet: upsample to the padded input, cut the padding, resize to the original image (bilinear)
        logits = torch.nn.functional.interpolate(mask_logits[None], size=tuple(padded), mode="bilinear",
                                                 align_corners=False)[0, :, : valid[0], : valid[1]]
        logits = torch.nn.functional.interpolate(logits[None], size=original, mode="bilinear", align_corners=False)[0]
        logits = logits[queries]
        binary = logits > 0
        mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        final = (top_scores * mask_scores).cpu()
        keep = torch.nonzero(final > self.min_score).flatten()
        binary, boxes = binary[keep].cpu(), _mask_boxes(binary[keep].cpu())
        found: dict[str, list[Detection]] = {}
        for row, k in enumerate(keep.tolist()):
            name = GENEVAL_CLASSES[int(labels[k])]
            found.setdefault(name, []).append(Detection(tuple(boxes[row].tolist()), float(final[k]),
                                                        binary[row].numpy()))
        return found


class MmdetDetector:
    """GenEval's own detector: mmdet ``init_detector(config, checkpoint)`` + ``inference_detector`` (mmdet 2.x).

    Args:
        config: the mmdet config file (GenEval: ``configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py``).
        checkpoint: the ``.pth`` weights (GenEval's ``evaluation/download_models.sh``).
        device: where mmdet runs.
    """

    def __init__(self, config: str, checkpoint: str, device: Any = None) -> None:
        try:
            from mmdet.apis import inference_detector, init_detector
        except ImportError as error:
            raise ImportError("geneval: detector='mmdet' needs mmdet 2.x and mmcv-full installed by you (GenEval's "
                              "environment); the default detector='mask2former' needs only transformers") from error
        self._infer = inference_detector
        self.model = init_detector(config, checkpoint, device=str(device or "cpu"))

    def detect(self, images: Sequence[Any]) -> list[dict[str, list[Detection]]]:
        results = []
        for image in images:
            result = self._infer(self.model, np.asarray(image)[:, :, ::-1].copy())  # mmdet reads ndarrays as BGR
            bbox = result[0] if isinstance(result, tuple) else result
            segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
            found: dict[str, list[Detection]] = {}
            for index, name in enumerate(GENEVAL_CLASSES):
                for j, row in enumerate(bbox[index]):
                    mask = None if segm is None else np.asarray(segm[index][j], dtype=bool)
                    found.setdefault(name, []).append(Detection(tuple(float(v) for v in row[:4]), float(row[4]), mask))
            results.append(found)
        return results
