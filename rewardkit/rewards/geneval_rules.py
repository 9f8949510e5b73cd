"""GenEval's scoring rules (Ghosh et al. 2023), pure Python on detections: no model here.

Upstream: ``djghosh13/geneval`` ``evaluation/evaluate_images.py`` (``evaluate_image``: per-class thresholding,
ordering and optional NMS; ``evaluate``: the include / exclude clauses, colours, relative positions),
``evaluation/summary_scores.py`` (per-tag and overall accuracy), and ``yifan123/reward-server``
``reward_server/gen_eval.py`` (``evaluate_reward``: the exact-count "strict" correctness and the partial
score that flow_grpo's ``geneval_score`` trains on). Each rule below is rewritten from those files.

Detections of one image are ``{class name: [Detection, ...]}`` sorted by decreasing confidence. A colour
classifier is any callable ``(class name, [Detection, ...]) -> [colour name, ...]``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["Detection", "GenEvalThresholds", "GENEVAL_CLASSES", "COLORS", "TAGS", "select_detections",
           "compute_iou", "relative_position", "evaluate_geneval", "evaluate_partial", "summarize", "check_metadata"]

# evaluation/object_names.txt (the 80 COCO classes in mmdet's order, GenEval's spelling)
GENEVAL_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
# evaluate_images.py COLORS (the order matters: ties in the CLIP argmax go to the first)
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# reward-server gen_eval.py required_keys (flow_grpo logs one accuracy per tag)
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")

ColorClassifier = Callable[[str, Sequence["Detection"]], Sequence[str]]


@dataclass(frozen=True)
class GenEvalThresholds:
    """evaluate_images.py ``--options`` defaults (also reward-server's constants).

    Attributes:
        threshold: confidence a detection must exceed (``threshold``, 0.3).
        counting_threshold: the same for ``tag == "counting"`` prompts (``counting_threshold``, 0.9).
        max_objects: detections kept per class, most confident first (``max_objects``, 16).
        max_overlap: NMS IoU; 1.0 keeps overlapping boxes (``max_overlap``, 1.0 = off).
        position_threshold: fraction of the summed box sizes ignored in offsets (``position_threshold``, 0.1).
    """

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0
    position_threshold: float = 0.1


@dataclass(frozen=True)
class Detection:
    """One detected object: ``box`` ``(x1, y1, x2, y2)`` in pixels, ``score`` in [0, 1], ``mask`` bool ``(H, W)``."""

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None


def check_metadata(metadata: Any, where: str = "geneval") -> dict:
    """Validate one GenEval metadata record (``tag``, ``include`` / ``exclude`` clauses); returns it."""
    if not isinstance(metadata, Mapping) or "tag" not in metadata or "include" not in metadata:
        raise ValueError(f"{where}: metadata must be a dict with 'tag' and 'include' (flow_grpo dataset/geneval/"
                         f"*.jsonl, GenEval prompts/evaluation_metadata.jsonl), got {metadata!r:.200}")
    for key in ("include", "exclude"):
        for clause in metadata.get(key, []):
            if not isinstance(clause, Mapping) or "class" not in clause or not isinstance(clause.get("count"), int) \
                    or clause["count"] < 1:
                raise ValueError(f"{where}: each {key!r} clause needs 'class' and an int 'count' >= 1, got {clause!r}")
            if "color" in clause and clause["color"] not in COLORS:
                raise ValueError(f"{where}: colour {clause['color']!r} is not one of GenEval's {COLORS}")
    return dict(metadata)


def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """evaluate_images.py ``compute_iou``: inclusive-pixel IoU (``+ 1`` on widths and heights)."""
    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0


def select_detections(per_class: Mapping[str, Sequence[Detection]], tag: str,
                      thresholds: GenEvalThresholds = GenEvalThresholds()) -> dict[str, list[Detection]]:
    """evaluate_images.py ``evaluate_image``'s filtering: score > threshold (the counting one for counting
    prompts), most confident first, at most ``max_objects``, then greedy NMS unless ``max_overlap == 1``."""
    limit = thresholds.counting_threshold if tag == "counting" else thresholds.threshold
    kept: dict[str, list[Detection]] = {}
    for name, found in per_class.items():
        scores = np.array([d.score for d in found], dtype=np.float64)
        order = np.argsort(scores)[::-1]  # upstream's order, ties included (reversed argsort, not a stable sort)
        order = order[scores[order] > limit][: thresholds.max_objects].tolist()
        chosen: list[Detection] = []
        while order:
            best = order.pop(0)
            chosen.append(found[best])
            if thresholds.max_overlap != 1:
                order = [i for i in order if compute_iou(found[best].box, found[i].box) < thresholds.max_overlap]
        if chosen:
            kept[name] = chosen
    return kept


def relative_position(a: Detection, b: Detection, position_threshold: float = 0.1) -> set[str]:
    """evaluate_images.py ``relative_position``: the relations of A to B after discounting box sizes."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - position_threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {name for name, hit in zip(RELATIONS, (dx < -0.5, dx > 0.5, dy < -0.5, dy > 0.5)) if hit}


def _colour_reason(name: str, count: int, wanted: str, colors: list[str]) -> str:
    found = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
    return f"expected {wanted} {name}>={count}, found {colors.count(wanted)} {wanted}; and {found}"


def _position_ok(found: Sequence[Detection], targets: Sequence[Detection], relation: str,
                 position_threshold: float) -> tuple[bool, str]:
    for obj in found:
        for target in targets:
            relations = relative_position(obj, target, position_threshold)
            if relation not in relations:
                return False, " and ".join(relations)
    return True, ""


def evaluate_geneval(objects: Mapping[str, Sequence[Detection]], metadata: Mapping, classify: ColorClassifier,
                     position_threshold: float = 0.1) -> tuple[bool, str]:
    """evaluate_images.py ``evaluate``: GenEval correctness (at least ``count`` of each included class, the
    ``count`` most confident of them of the colour, in the relation; fewer than ``count`` of each excluded one)."""
    correct, reasons, groups = True, [], []
    for req in metadata.get("include", []):
        name, count, matched = req["class"], req["count"], True
        found = list(objects.get(name, []))[:count]
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = list(classify(name, found))
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    reasons.append(_colour_reason(name, count, req["color"], colors))
            if "position" in req and matched:
                relation, group = req["position"]
                if groups[group] is None:
                    correct = matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    ok, seen = _position_ok(found, groups[group], relation, position_threshold)
                    if not ok:
                        correct = matched = False
                        reasons.append(f"expected {name} {relation} target, found {seen} target")
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        if len(objects.get(req["class"], [])) >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(objects[req['class']])}")
    return correct, "\n".join(reasons)


def evaluate_partial(objects: Mapping[str, Sequence[Detection]], metadata: Mapping, classify: ColorClassifier,
                     position_threshold: float = 0.1) -> tuple[bool, float, str]:
    """reward-server gen_eval.py ``evaluate_reward``: ``(strict_correct, partial score, reason)``.

    Strict = exactly ``count`` of each included class (all of them the colour, all in the relation); excludes
    are not checked. The score averages per-clause terms: ``1 - |count - found| / count`` for the count, the same
    for the colour, and for a position 1.0 (kept as upstream: a failed position appends 0.0 and then 1.0).
    """
    correct, reasons, groups, terms = True, [], [], []
    for req in metadata.get("include", []):
        name, count, matched = req["class"], req["count"], True
        found = list(objects.get(name, []))
        terms.append(1 - abs(count - len(found)) / count)
        if len(found) != count:
            correct = matched = False
            reasons.append(f"expected {name}=={count}, found {len(found)}")
            if "color" in req or "position" in req:
                terms.append(0.0)
        else:
            if "color" in req:
                colors = list(classify(name, found))
                terms.append(1 - abs(count - colors.count(req["color"])) / count)
                if colors.count(req["color"]) != count:
                    correct = matched = False
                    reasons.append(_colour_reason(name, count, req["color"], colors))
            if "position" in req and matched:
                relation, group = req["position"]
                if groups[group] is None:
                    correct = matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                    terms.append(0.0)
                else:
                    ok, seen = _position_ok(found, groups[group], relation, position_threshold)
                    if not ok:
                        correct = matched = False
                        reasons.append(f"expected {name} {relation} target, found {seen} target")
                        terms.append(0.0)
                    terms.append(1.0)  # upstream appends 1.0 after the loop, also after a failure
        groups.append(found if matched else None)
    return correct, (sum(terms) / len(terms) if terms else 0.0), "\n".join(reasons)


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """summary_scores.py: images, prompts, % correct images / prompts, per-tag accuracy (first-seen tag order)
    and the overall score (mean of the per-tag accuracies). ``rows`` need ``tag``, ``correct`` and ``metadata``
    (any hashable prompt key); rows whose ``correct`` is None (not scored) are left out and counted."""
    scored = [r for r in rows if r.get("correct") is not None]
    by_tag: dict[str, list[bool]] = defaultdict(list)
    by_prompt: dict[Any, list[bool]] = defaultdict(list)
    for row in scored:
        by_tag[row["tag"]].append(bool(row["correct"]))
        by_prompt[row["metadata"]].append(bool(row["correct"]))
    tags = {tag: {"accuracy": float(np.mean(v)), "correct": int(sum(v)), "n": len(v)} for tag, v in by_tag.items()}
    return {
        "images": len(scored), "not_scored": len(rows) - len(scored), "prompts": len(by_prompt),
        "correct_images": float(np.mean([r["correct"] for r in scored])) if scored else float("nan"),
        "correct_prompts": float(np.mean([any(v) for v in by_prompt.values()])) if by_prompt else float("nan"),
        "tags": tags, "overall": float(np.mean([t["accuracy"] for t in tags.values()])) if tags else float("nan"),
    }
