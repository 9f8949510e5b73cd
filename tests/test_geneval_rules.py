"""GenEval's rules against upstream's evaluation code on many synthetic detection sets.

The ``upstream_*`` functions below are rewritten, for this test, from ``djghosh13/geneval``
``evaluation/evaluate_images.py`` (``evaluate_image``'s filtering loop, ``compute_iou``, ``relative_position``,
``evaluate``) and ``yifan123/reward-server`` ``reward_server/gen_eval.py`` (``evaluate_reward``), keeping their
data layout: per class an ``(N, 5)`` array ``[x1, y1, x2, y2, score]`` and objects as ``(bbox_row, mask)``.
The colour classifier is replaced on both sides by the same deterministic function of the box.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from rewardkit.rewards.geneval_rules import (
    COLORS,
    Detection,
    GenEvalThresholds,
    check_metadata,
    evaluate_geneval,
    evaluate_partial,
    select_detections,
    summarize,
)

CLASSES = ("cat", "dog", "car", "bench")
THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, POSITION_THRESHOLD = 0.3, 0.9, 16, 0.1


def colour_of(box) -> str:
    return COLORS[int(box[0] + 3 * box[1]) % len(COLORS)]


# ------------------------------------------------------------------------------ upstream, rewritten
def upstream_iou(a, b):
    area = lambda box: max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)  # noqa: E731
    i = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    u = area(a) + area(b) - i
    return i / u if u else 0


def upstream_filter(bbox: dict, tag: str, nms: float):
    confidence = THRESHOLD if tag != "counting" else COUNTING_THRESHOLD
    detected = {}
    for name in CLASSES:
        ordering = np.argsort(bbox[name][:, 4])[::-1]
        ordering = ordering[bbox[name][ordering, 4] > confidence]
        ordering = ordering[:MAX_OBJECTS].tolist()
        detected[name] = []
        while ordering:
            top = ordering.pop(0)
            detected[name].append((bbox[name][top], None))
            ordering = [o for o in ordering if nms == 1 or upstream_iou(bbox[name][top], bbox[name][o]) < nms]
        if not detected[name]:
            del detected[name]
    return detected


def upstream_relative_position(obj_a, obj_b):
    boxes = np.array([obj_a[0], obj_b[0]])[:, :4].reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5: rels.add("left of")  # noqa: E701
    if dx > 0.5: rels.add("right of")  # noqa: E701
    if dy < -0.5: rels.add("above")  # noqa: E701
    if dy > 0.5: rels.add("below")  # noqa: E701
    return rels


def upstream_colors(found):
    return [colour_of(box) for box, _ in found]


def upstream_evaluate(objects, metadata):
    correct, matched_groups = True, []
    for req in metadata.get("include", []):
        name, matched = req["class"], True
        found = objects.get(name, [])[: req["count"]]
        if len(found) < req["count"]:
            correct = matched = False
        else:
            if "color" in req and upstream_colors(found).count(req["color"]) < req["count"]:
                correct = matched = False
            if "position" in req and matched:
                rel, group = req["position"]
                if matched_groups[group] is None:
                    correct = matched = False
                else:
                    for obj in found:
                        for target in matched_groups[group]:
                            if rel not in upstream_relative_position(obj, target):
                                correct = matched = False
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        if len(objects.get(req["class"], [])) >= req["count"]:
            correct = False
    return correct


def upstream_evaluate_reward(objects, metadata):
    correct, rewards, matched_groups = True, [], []
    for req in metadata.get("include", []):
        name, matched = req["class"], True
        found = objects.get(name, [])
        rewards.append(1 - abs(req["count"] - len(found)) / req["count"])
        if len(found) != req["count"]:
            correct = matched = False
            if "color" in req or "position" in req:
                rewards.append(0.0)
        else:
            if "color" in req:
                colors = upstream_colors(found)
                rewards.append(1 - abs(req["count"] - colors.count(req["color"])) / req["count"])
                if colors.count(req["color"]) != req["count"]:
                    correct = matched = False
            if "position" in req and matched:
                rel, group = req["position"]
                if matched_groups[group] is None:
                    correct = matched = False
                    rewards.append(0.0)
                else:
                    for obj in found:
                        for target in matched_groups[group]:
                            if rel not in upstream_relative_position(obj, target):
                                correct = matched = False
                                rewards.append(0.0)
                                break
                        if not matched:
                            break
                    rewards.append(1.0)
        matched_groups.append(found if matched else None)
    return correct, sum(rewards) / len(rewards) if rewards else 0


# ------------------------------------------------------------------------------------ synthetic sets
def random_metadata(rng: random.Random) -> dict:
    tag = rng.choice(("single_object", "two_object", "counting", "colors", "position", "color_attr"))
    a, b = rng.sample(CLASSES, 2)
    if tag == "single_object":
        return {"tag": tag, "include": [{"class": a, "count": 1}]}
    if tag == "two_object":
        return {"tag": tag, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}]}
    if tag == "counting":
        n = rng.randint(2, 4)
        return {"tag": tag, "include": [{"class": a, "count": n}], "exclude": [{"class": a, "count": n + 1}]}
    if tag == "colors":
        return {"tag": tag, "include": [{"class": a, "count": 1, "color": rng.choice(COLORS)}]}
    if tag == "position":
        return {"tag": tag, "include": [{"class": b, "count": 1},
                                        {"class": a, "count": 1, "position": [rng.choice(("left of", "right of", "above", "below")), 0]}]}
    return {"tag": tag, "include": [{"class": a, "count": 1, "color": rng.choice(COLORS)},
                                    {"class": b, "count": 1, "color": rng.choice(COLORS)}]}


def random_detections(rng: random.Random) -> dict[str, np.ndarray]:
    out = {}
    for name in CLASSES:
        rows = []
        for _ in range(rng.choice((0, 0, 1, 1, 2, 3, 5))):
            x, y = rng.uniform(0, 400), rng.uniform(0, 400)
            w, h = rng.uniform(5, 150), rng.uniform(5, 150)
            rows.append([x, y, x + w, y + h, rng.choice((0.2, 0.35, 0.5, 0.8, 0.92, 0.97, rng.random()))])
        out[name] = np.array(rows, dtype=np.float32).reshape(-1, 5)
    return out


def to_detections(bbox: dict[str, np.ndarray]) -> dict[str, list[Detection]]:
    return {n: [Detection(tuple(float(v) for v in r[:4]), float(r[4])) for r in rows] for n, rows in bbox.items()}


@pytest.mark.parametrize("nms", [1.0, 0.5])
def test_rules_equal_upstream_on_random_detection_sets(nms: float) -> None:
    rng = random.Random(int(nms * 10))
    classify = lambda name, found: [colour_of(d.box) for d in found]  # noqa: E731
    thresholds = GenEvalThresholds(max_overlap=nms)
    outcomes = {"correct": 0, "strict": 0, "partial": set()}
    for _ in range(1500):
        metadata, bbox = random_metadata(rng), random_detections(rng)
        theirs = upstream_filter(bbox, metadata["tag"], nms)
        ours = select_detections(to_detections(bbox), metadata["tag"], thresholds)
        assert {n: [tuple(np.float32(v) for v in d.box) for d in ds] for n, ds in ours.items()} == \
            {n: [tuple(r[:4]) for r, _ in ds] for n, ds in theirs.items()}
        correct, _ = evaluate_geneval(ours, metadata, classify)
        strict, partial, _ = evaluate_partial(ours, metadata, classify)
        assert correct == upstream_evaluate(theirs, metadata)
        assert (strict, pytest.approx(partial, abs=1e-12)) == upstream_evaluate_reward(theirs, metadata)
        outcomes["correct"] += correct
        outcomes["strict"] += strict
        outcomes["partial"].add(round(partial, 6))
    assert 50 < outcomes["correct"] < 1450 and 20 < outcomes["strict"] < 1450  # both outcomes exercised
    assert len(outcomes["partial"]) > 5


def test_golden_position_and_counting_cases() -> None:
    cat, dog = Detection((0, 0, 10, 10), 0.9), Detection((100, 0, 110, 10), 0.9)
    meta = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                           {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    never = lambda name, found: []  # noqa: E731
    assert evaluate_geneval({"cat": [cat], "dog": [dog]}, meta, never)[0]
    wrong, reason = evaluate_geneval({"cat": [dog], "dog": [cat]}, meta, never)
    assert not wrong and "expected cat left of target, found right of target" in reason
    # upstream's partial score for a failed position: count 1, count 1, then 0.0 and 1.0 -> 3 / 4
    assert evaluate_partial({"cat": [dog], "dog": [cat]}, meta, never)[1] == pytest.approx(0.75)
    counting = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    three = [Detection((i * 50, 0, i * 50 + 10, 10), 0.95) for i in range(3)]
    assert not evaluate_geneval({"cat": three}, counting, never)[0]  # the exclude clause fails
    assert evaluate_partial({"cat": three}, counting, never)[:2] == (False, pytest.approx(0.5))


def test_summary_matches_summary_scores() -> None:
    rows = [{"tag": "a", "correct": True, "metadata": "p1"}, {"tag": "a", "correct": False, "metadata": "p1"},
            {"tag": "b", "correct": False, "metadata": "p2"}, {"tag": "b", "correct": None, "metadata": "p3"}]
    summary = summarize(rows)
    assert summary["images"] == 3 and summary["not_scored"] == 1 and summary["prompts"] == 2
    assert summary["correct_images"] == pytest.approx(1 / 3) and summary["correct_prompts"] == 0.5
    assert summary["tags"]["a"]["accuracy"] == 0.5 and summary["overall"] == pytest.approx(0.25)


def test_bad_metadata_is_refused() -> None:
    with pytest.raises(ValueError, match="'tag' and 'include'"):
        check_metadata({"prompt": "a cat"})
    with pytest.raises(ValueError, match="int 'count'"):
        check_metadata({"tag": "single_object", "include": [{"class": "cat"}]})
    with pytest.raises(ValueError, match="colour 'teal'"):
        check_metadata({"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "teal"}]})
