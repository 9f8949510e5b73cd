"""The ``ocr`` reward: flow_grpo's formula on golden and random cases, the REAL PP-OCRv4 models (rapidocr wheel)
on text drawn with DejaVu Sans, bad input, backends, the CLI."""

from __future__ import annotations

import json
import math
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.rewards.ocr import OcrReward, ocr_reward_value, quoted_target
from rewardkit.rewards.ocr_backends import Recognition, RapidOcrBackend
from rewardkit.testing.ocr import render_text

PHRASE = "Spring Collection 2024"
PROMPT = f'A runway with a backdrop displaying "{PHRASE}", soft light'  # flow_grpo dataset/ocr/test.txt style


def upstream_ocr_reward(lines: list[tuple[str, float]], prompt: str) -> float:
    """flow_grpo ``flow_grpo/ocr.py`` ``OcrScorer.__call__`` for one row, rewritten from its source for this test:
    ``lines`` stands for PaddleOCR's ``result[0]`` as ``(text, confidence)`` pairs (``None`` when empty)."""
    from Levenshtein import distance

    target = prompt.split('"')[1]
    recognized = "".join(text if conf > 0 else "" for text, conf in lines) if lines else ""
    recognized = recognized.replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    dist = 0 if target in recognized else distance(recognized, target)
    dist = min(dist, len(target))
    return 1 - dist / len(target)


class ListBackend:
    """A backend answering fixed lines per row (the formula tests need no OCR model)."""

    def __init__(self, rows: list[Recognition]) -> None:
        self.rows, self.calls = rows, []

    def recognize(self, arrays):
        self.calls.append(len(arrays))
        return self.rows[: len(arrays)]


@pytest.fixture(scope="module")
def ocr(tiny_root):
    return rkt.load_tiny("ocr", tiny_root / "ocr-module")


def _tensor(*arrays: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


# ----------------------------------------------------------------------------------------- the formula
@pytest.mark.parametrize("recognised, expected", [
    ("Spring Collection 2024", 1.0),  # exact
    ("SPRING collection 2024 !!", 1.0),  # substring after spaces / case are dropped: distance 0
    ("Spring Colection 2024", 1 - 1 / 20),  # one deletion over 20 normalised characters
    ("", 0.0),  # nothing read: distance = len(target)
    ("x" * 60, 0.0),  # many unrelated characters: capped at len(target)
])
def test_golden_cases_match_flow_grpo(recognised: str, expected: float) -> None:
    assert ocr_reward_value(recognised, PHRASE) == pytest.approx(expected, abs=1e-12)
    assert upstream_ocr_reward([(recognised, 0.9)], PROMPT) == pytest.approx(expected, abs=1e-12)


def test_random_cases_match_the_upstream_formula() -> None:
    rng = random.Random(0)
    alphabet = "abcAB C12 "
    prompts, rows = [], []
    for _ in range(300):
        target = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) + "z"  # never empty
        lines = [("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10))), rng.choice([0.0, 0.7, 0.99]))
                 for _ in range(rng.randint(0, 3))]
        if rng.random() < 0.3:  # the target inside the read text
            lines.append((target.upper(), 0.8))
        prompts.append(f'prefix "{target}" suffix "other"')
        rows.append(Recognition(lines))
    reward = OcrReward(ListBackend(rows))
    out = reward.score_arrays([np.zeros((4, 4, 3), np.uint8)] * len(rows), prompts, torch.device("cpu"))
    expected = torch.tensor([upstream_ocr_reward(r.lines, p) for r, p in zip(rows, prompts)], dtype=torch.float32)
    torch.testing.assert_close(out.scores, expected, rtol=0, atol=0)
    assert 0 < (expected == 1).float().mean() < 1 and 0 < (expected == 0).float().mean() < 1


def test_targets_follow_upstream_split() -> None:
    assert quoted_target('write "a b" and "c"') == "a b"
    assert quoted_target('one quote "open ended') == "open ended"  # upstream's split('"')[1]
    assert quoted_target("no quotes") is None


def test_rows_without_a_target_are_nan_with_reason_and_skip_ocr() -> None:
    backend = ListBackend([Recognition([("hello", 0.9)])])
    out = OcrReward(backend).evaluate(rkt.random_images(3), ["no quotes here", 'say ""', 'say " "'])
    assert torch.isnan(out.scores).all() and backend.calls == []
    assert "no double-quoted text" in out.details["failure"][0]
    assert all("empty" in f for f in out.details["failure"][1:])


@pytest.mark.parametrize("on_error, expected", [("zero", 0.0), ("nan", math.nan)])
def test_an_ocr_error_scores_as_chosen_with_the_reason(on_error: str, expected: float) -> None:
    backend = ListBackend([Recognition(error="RuntimeError: engine broke"), Recognition([("hello", 0.9)])])
    out = OcrReward(backend, on_error=on_error).evaluate(rkt.random_images(2), 'say "hello"')
    assert out.details["error"] == ["RuntimeError: engine broke", None]
    torch.testing.assert_close(out.scores, torch.tensor([expected, 1.0]), equal_nan=True)
    assert (out.details["failure"][0] is None) == (on_error == "zero")


# ------------------------------------------------------------------------------ the real PP-OCRv4 models
def test_real_models_read_rendered_text(ocr) -> None:
    half = " ".join(PHRASE.split()[:2])  # "Spring Collection": 2 of 3 words
    images = _tensor(render_text(PHRASE), np.full((256, 512, 3), 255, np.uint8), render_text("2024"),
                     render_text(half))
    out = ocr.evaluate(images, PROMPT)
    exact, blank, third, two_thirds = out.scores.tolist()
    assert exact >= 0.95 and out.details["raw"][0].replace(" ", "").lower() == "springcollection2024"
    assert blank == 0.0 and out.details["raw"][1] == ""
    assert 0 < third < two_thirds < exact  # partial text scores in between, more text scores more
    assert out.details["failure"] == [None] * 4


def test_grayscale_rgba_and_tiny_images_through_the_pil_path(ocr) -> None:
    rgb = Image.fromarray(render_text("hello world"))
    rgba = rgb.convert("RGBA")
    out = ocr.evaluate_pil([rgb.convert("L"), rgba, Image.new("RGB", (8, 8), "white"), rgb], 'a sign "Hello World"')
    assert out.scores[0] >= 0.95 and out.scores[1] >= 0.95 and out.scores[3] >= 0.95
    assert out.scores[2] == 0.0  # a tiny blank image reads nothing, without an error
    torch.testing.assert_close(ocr(_tensor(np.asarray(rgb)), 'a sign "Hello World"'), out.scores[3:])


def test_threaded_rows_equal_one_at_a_time(tiny_root) -> None:
    weights = rkt.tiny_ocr(tiny_root / "ocr-threads")["weights"]
    images = _tensor(*(render_text(t) for t in ("alpha", "Beta 2", "gamma ray", "delta")))
    prompts = ['"alpha"', '"beta 2"', '"gamma"', '"epsilon"']
    sequential = rk.load("ocr", weights=weights, workers=1).evaluate(images, prompts)
    threaded = rk.load("ocr", weights=weights, workers=4).evaluate(images, prompts)
    assert threaded.details["raw"] == sequential.details["raw"]
    torch.testing.assert_close(threaded.scores, sequential.scores, rtol=0, atol=0)
    assert sequential.scores[:3].min() >= 0.95 and sequential.scores[3] < 0.5


def test_pickled_reward_rebuilds_its_engine(ocr) -> None:
    images = _tensor(render_text("rewardkit"))
    clone = pickle.loads(pickle.dumps(ocr))
    assert clone(images, '"rewardkit"').item() == ocr(images, '"rewardkit"').item() >= 0.95


def test_composes_with_other_rewards(ocr) -> None:
    total = rk.compose({ocr: 2.0})
    images = _tensor(render_text("rewardkit"))
    torch.testing.assert_close(total(images, '"rewardkit"'), 2.0 * ocr(images, '"rewardkit"'))
    # flow_grpo passes metadata to every reward; ocr ignores it (so it composes with geneval)
    torch.testing.assert_close(ocr(images, '"rewardkit"', metadata=[{"tag": "x"}]), ocr(images, '"rewardkit"'))


# ------------------------------------------------------------------------------------ loading and backends
def test_loader_errors_name_the_fix(tmp_path) -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        rk.load("ocr", backend="tesseract")
    with pytest.raises(ValueError, match=r"\*det\*\.onnx"):
        rk.load("ocr", weights=str(tmp_path))
    with pytest.raises(TypeError, match="only apply to backend='vlm'"):
        rk.load("ocr", server="http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="on_error"):
        rk.load("ocr", on_error="skip")
    with pytest.raises(TypeError, match="unexpected keyword"):
        OcrReward(ListBackend([]))(rkt.random_images(1), '"a"', source=rkt.random_images(1))


def test_paddleocr_backend_says_how_to_install() -> None:
    import rapidocr_onnxruntime  # noqa: F401 - a dev dependency; a missing install must fail, not skip
    try:
        import paddleocr  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install"):
            rk.load("ocr", backend="paddleocr")
    else:  # pragma: no cover - only where paddleocr is installed
        assert isinstance(rk.load("ocr", backend="paddleocr"), OcrReward)


def test_vlm_backend_transcribes_through_the_judge_plumbing(tmp_path) -> None:
    folder = rkt.tiny_qwen_vl(tmp_path, "qwen2_vl")
    answer = "SPRING\nCollection 2024"
    factory = lambda: rkt.forced_answer_processor(rkt.tiny_qwen_tokenizer(), answer)  # noqa: E731
    reward = rk.load("ocr", backend="vlm", weights=str(folder), max_new_tokens=len(answer) + 4,
                     logits_processor_factory=factory)
    out = reward.evaluate(rkt.random_images(2, 56, 56), [PROMPT, 'the word "Summer"'])
    assert out.details["raw"] == ["SPRINGCollection 2024"] * 2  # one line per answer line, joined as upstream
    assert out.scores[0].item() == 1.0 and out.scores[1].item() < 1.0


def test_rapidocr_backend_rejects_bad_workers() -> None:
    with pytest.raises(ValueError, match="workers"):
        RapidOcrBackend(workers=0)


# ----------------------------------------------------------------------------------------------- the CLI
def test_cli_scores_a_folder_with_prompts(tmp_path, capsys) -> None:
    from rewardkit.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(render_text("open late")).save(folder / "a.png")
    Image.fromarray(np.full((64, 96, 3), 255, np.uint8)).save(folder / "b.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"image": n, "prompt": 'a shop sign "Open Late"'}) + "\n"
                               for n in ("a.png", "b.png")))
    assert main(["score", "ocr", "--images", str(folder), "--prompts", str(prompts), "--out",
                 str(tmp_path / "s.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert rows[0]["ocr"] >= 0.95 and rows[1]["ocr"] == 0.0
    assert "ocr" in capsys.readouterr().out
