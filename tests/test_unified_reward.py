"""UnifiedReward 2.0 / Edit: byte-exact prompts, parsers on golden and broken answers, and the judges end to end.

Golden strings and hashes come from reference/vlm_family.md §8.2. End-to-end tests run the real generate path
(TransformersBackend on tiny random Qwen3.5 / Qwen3-VL folders) with the answer forced by
``forced_answer_processor``, so parsed scores must equal known numbers exactly.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.rewards import unified_reward_prompts as P
from rewardkit.rewards.unified_reward import UnifiedReward2, UnifiedRewardEdit
from rewardkit.vlm.requests import Completion

UR2_ANSWER = "**Alignment Score (1-5):** 3.8\nCoherence Score (1-5): 4\nStyle Score: 2.5"
UR2_MEAN = (3.8 + 4.0 + 2.5) / 3


def _digest(text: str) -> tuple[int, str]:
    return len(text), hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- prompts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build, expected", [
    (lambda: P.ur2_prompt("a dog"), (730, "c8e8e60d2593ac80")),
    (lambda: P.ur2_prompt("a dog", "diffsynth"), (834, "6687f2390c50ff76")),
    (lambda: P.edit_prompt("make it red"), (1523, "a97bf6f142c0cc2d")),
    (lambda: P.edit_prompt("make it red", "edit_pairwise_rank"), (1984, "0e3067bbb640cc3e")),
    (lambda: P.edit_prompt("make it red", "edit_pairwise_score"), (2424, "3fa5a9c24222f095")),
], ids=["ur2-upstream", "ur2-diffsynth", "edit-pointwise", "edit-rank", "edit-pair-score"])
def test_prompts_are_byte_exact(build, expected) -> None:
    assert _digest(build()) == expected


def test_prompt_details() -> None:
    assert P.ur2_prompt(None).endswith("Text Caption: []")
    assert P.ur2_prompt("a {x} cat").endswith("Text Caption: [a {x} cat]")  # braces are not format fields
    assert P.edit_prompt(None).endswith("Editing instruction:\n")
    assert "Do not include explanations" in P.ur2_prompt("c", "diffsynth")
    assert "Do not include explanations" not in P.ur2_prompt("c")
    with pytest.raises(ValueError, match="prompt_variant"):
        P.ur2_prompt("c", "other")
    with pytest.raises(ValueError, match="task"):
        P.edit_prompt("c", "edit_pointwise_quality")


# ---- UR2 parser --------------------------------------------------------------------------------------------
def test_ur2_parser_golden_and_partial() -> None:
    answer = P.parse_ur2(UR2_ANSWER)
    assert answer.fields == {"alignment": 3.8, "coherence": 4.0, "style": 2.5} and answer.reason is None
    assert answer.score == pytest.approx(UR2_MEAN, abs=1e-12) and answer.extra["parsed_ok"]
    upstream = "Alignment Score (1-5): 2.694700002670288\nCoherence Score (1-5): 2.371500015258789\n" \
               "Style Score (1-5): 2.802500009536743"
    assert P.parse_ur2(upstream).fields["coherence"] == 2.371500015258789
    only = P.parse_ur2("Alignment Score (1-5): 4")
    assert math.isnan(only.score) and only.reason == "missing dimensions: coherence, style"
    assert only.fields["alignment"] == 4.0 and math.isnan(only.fields["style"]) and not only.extra["parsed_ok"]
    lenient = P.parse_ur2("Alignment Score (1-5): 4", require_all=False)  # DiffSynth's partial mean
    assert lenient.score == 4.0 and lenient.reason.startswith("partial")


@pytest.mark.parametrize("text, kind", [
    ("The image is nice.", "no scores"),
    ("Alignment Score (1-5)\uff1a 4\nCoherence Score (1-5)\uff1a 4\nStyle Score (1-5)\uff1a 4", "no scores"),
    ("Alignment Score (1-5): 4\nCoherence Score (1-5): 3\nStyle Sc", "missing dimensions"),  # truncated
    ("<think>Alignment Score (1-5): 1", "unterminated thinking"),
    ("", "empty answer"),
    ("  \n", "empty answer"),
    ("<think>Alignment Score (1-5): 1\nCoherence Score (1-5): 1\nStyle Score (1-5): 1</think>\n", "empty answer"),
])
def test_ur2_parser_failures_are_nan_with_a_reason(text: str, kind: str) -> None:
    answer = P.parse_ur2(text)
    assert math.isnan(answer.score) and answer.reason.startswith(kind)
    assert set(answer.fields) == {"alignment", "coherence", "style"}


def test_ur2_parser_reads_only_after_the_last_think() -> None:
    reasoning = "<think>Alignment Score (1-5): 1\nCoherence Score (1-5): 1\nStyle Score (1-5): 1</think>\n\n"
    assert P.parse_ur2(reasoning + UR2_ANSWER).score == pytest.approx(UR2_MEAN, abs=1e-12)
    # the template opened the block (enable_thinking=True): only '</think>' appears in the answer
    assert P.parse_ur2("hmm</think>" + UR2_ANSWER, thinking=True).fields["style"] == 2.5
    assert P.parse_ur2(UR2_ANSWER, thinking=True).reason.startswith("unterminated thinking")


# ---- UR-Edit parsers ---------------------------------------------------------------------------------------
def test_edit_pointwise_parser() -> None:
    upstream_format = P.parse_edit_pointwise('{\n\n"reasoning" : "ok",\n"score" : [20, 18],\n}')
    assert upstream_format.score == 19.0 and upstream_format.fields == {"editing_success": 20.0, "overediting": 18.0}
    assert upstream_format.extra == {"parsed_ok": True, "reasoning": "ok"}  # DiffSynth gives reasoning None here
    assert P.parse_edit_pointwise('{"reasoning": "ok", "score": ["21", 17.5]}').score == 19.25
    assert P.parse_edit_pointwise('reasoning: fine. "score": [10, 12.5]').fields["overediting"] == 12.5
    assert P.parse_edit_pointwise("output score = [3, 5]").score == 4.0
    assert P.parse_edit_pointwise('<think>"score": [0, 0]</think>{"score": [25, 25]}').score == 25.0


@pytest.mark.parametrize("text, kind", [
    ('{"reasoning": "the edit follows the instruction but', "no score list"),  # truncated
    ('{"reasoning": "ok", "score": [20, 18, 3]}', "wrong score count"),
    ('"score": [20]', "wrong score count"),
    ('{"score": [NaN, 3]}', "wrong score count"),
    ("looks fine to me", "no score list"),
    ('<think>"score": [20, 18]', "unterminated thinking"),
    ("", "empty answer"),
])
def test_edit_pointwise_failures_are_nan_with_a_reason(text: str, kind: str) -> None:
    answer = P.parse_edit_pointwise(text)
    assert math.isnan(answer.score) and answer.reason.startswith(kind) and not answer.extra["parsed_ok"]


@pytest.mark.parametrize("text, fixed, diffsynth", [
    ("Edited Image 2 is better.", 2, 2),
    ("Compared with Image 1, Image 2 is better.", 2, 1),  # DiffSynth's documented mis-parse
    ("Edited Image 1 is better than Edited Image 2.", 1, 1),
    ("Both images are equally good.", 0, 0),
    ("The better image is Image 1.", 1, None),
    ("Winner: **Edited Image 2**", 2, None),
    ("Edited Image 2", 2, None),
    ("Image 1 is worse than Image 2.", 2, None),
    ("Image 1 is better in fidelity, but overall the second image is better.", 2, 1),
    ("<think>Image 1 is better at first sight.</think>\nEdited Image 2 is better.", 2, 2),
])
def test_edit_rank_parsers(text: str, fixed: int, diffsynth: int | None) -> None:
    answer = P.parse_edit_rank(text)
    assert answer.extra == {"parsed_ok": True, "winner": fixed}
    assert answer.score == {1: 1.0, 2: 0.0, 0: 0.5}[fixed]
    legacy = P.parse_edit_rank(text, rank_parser="diffsynth")
    if diffsynth is None:
        assert math.isnan(legacy.score) and legacy.reason.startswith("no verdict")
    else:
        assert legacy.extra["winner"] == diffsynth


@pytest.mark.parametrize("text, kind, parsers", [
    ("I cannot decide.", "no verdict", P.RANK_PARSERS),
    ("Image 1 is not better.", "no verdict", ("fixed",)),  # DiffSynth's regex reads image 1 here
    ("<think>Image 1 is better", "unterminated thinking", P.RANK_PARSERS), ("", "empty answer", P.RANK_PARSERS),
])
def test_edit_rank_failure_is_never_a_tie(text: str, kind: str, parsers: tuple[str, ...]) -> None:
    for parser in parsers:
        answer = P.parse_edit_rank(text, rank_parser=parser)
        assert math.isnan(answer.score) and answer.reason.startswith(kind) and "winner" not in answer.extra
    with pytest.raises(ValueError, match="rank_parser"):
        P.parse_edit_rank("Image 1 is better", rank_parser="strict")


def test_edit_pairwise_score_parser() -> None:
    signed = P.parse_edit_pairwise_score("Image 1: 7.5\nImage 2: -2.0")
    assert signed.fields == {"image_1_score": 7.5, "image_2_score": -2.0} and signed.score == 9.5
    listed = P.parse_edit_pairwise_score('"score": [3.1, 4.2]')
    assert listed.fields == {"image_1_score": 3.1, "image_2_score": 4.2} and listed.score == 3.1 - 4.2
    # DiffSynth's fallback class [^\n\r-+\d] is a range that also excludes spaces, so it misses this one
    assert P.parse_edit_pairwise_score("Scores: 6 and 4").fields == {"image_1_score": 6.0, "image_2_score": 4.0}
    for text, kind in (("Image 1 is nicer", "no scores"), ('"score": [3, 4, 5]', "wrong score count"),
                       ("<think>Image 1: 3, Image 2: 4", "unterminated thinking"), ("", "empty answer")):
        answer = P.parse_edit_pairwise_score(text)
        assert math.isnan(answer.score) and answer.reason.startswith(kind), text


# ---- the judges on a scripted backend (no model) ------------------------------------------------------------
class ScriptedBackend:
    """Records requests and answers each with the next scripted text (``None`` = a failed generation)."""

    def __init__(self, answers: list[str | None]) -> None:
        self.answers, self.requests = list(answers), []

    def generate(self, requests):
        self.requests.extend(requests)
        texts = [self.answers.pop(0) for _ in requests]
        return [Completion(t, None if t is not None else "timeout after 120 s") for t in texts]


def test_ur2_rows_map_to_their_answers() -> None:
    backend = ScriptedBackend([UR2_ANSWER, "no idea", None])
    reward = rk.load("unified-reward-2", backend=backend)
    images = rkt.random_images(3, 32, 32)
    out = reward.evaluate(images, ["a cat", "a dog", "a cow"])
    assert out.scores.dtype == torch.float32 and out.scores.shape == (3,)
    assert out.scores[0].item() == pytest.approx(UR2_MEAN, rel=1e-6) and out.scores[1:].isnan().all()
    assert out.details["failure"][0] is None and out.details["failure"][1].startswith("no scores")
    assert out.details["failure"][2].startswith("generation failed")
    assert out.details["raw"] == [UR2_ANSWER, "no idea", None] and out.details["parsed_ok"] == [True, False, None]
    assert out.details["style"][0].item() == 2.5 and out.details["style"][1:].isnan().all()
    content = backend.requests[1].messages[0]["content"]
    assert backend.requests[1].messages[0]["role"] == "user" and [c["type"] for c in content] == ["image", "text"]
    assert content[1]["text"] == P.ur2_prompt("a dog") and content[0]["image"].size == (32, 32)
    assert backend.requests[0].settings.enable_thinking is False and backend.requests[0].settings.max_new_tokens == 1024
    assert reward.failure_counts == {"no scores": 1, "generation failed": 1}


def test_edit_requests_order_images_source_first() -> None:
    edited, source, other = (rkt.random_images(2, 32, 24, seed=s) for s in (1, 2, 3))
    backend = ScriptedBackend(["Image 2 is better"] * 2)
    reward = rk.load("unified-reward-edit", backend=backend, task="edit_pairwise_rank")
    out = reward.evaluate(edited, "make it red", source=source, other=other)
    assert out.scores.tolist() == [0.0, 0.0] and out.details["winner"] == [2, 2]
    content = backend.requests[0].messages[0]["content"]
    pixels = [torch.tensor(c["image"].getpixel((0, 0))) for c in content[:3]]
    expected = [(x[0, :, 0, 0] * 255).round().to(torch.int64) for x in (source, edited, other)]
    assert all(torch.equal(p, e) for p, e in zip(pixels, expected))
    assert content[3] == {"type": "text", "text": P.edit_prompt("make it red", "edit_pairwise_rank")}


def test_edit_input_errors() -> None:
    reward = rk.load("unified-reward-edit", backend=ScriptedBackend([]))
    images, source = rkt.random_images(3, 16, 16), rkt.random_images(3, 20, 16, seed=4)
    with pytest.raises(ValueError, match="needs source="):
        reward(images, "make it red")
    with pytest.raises(ValueError, match="source= must hold one image per edited image: expected 3 rows, got 1"):
        reward(images, "make it red", source=source[:1])
    with pytest.raises(ValueError, match=r"source=.*\[0, 1\]"):
        reward(images, "make it red", source=source * 255)
    with pytest.raises(ValueError, match="other= is only used by the pairwise tasks"):
        reward(images, "make it red", source=source, other=images)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        reward(images, "make it red", source=source, reference=images)
    with pytest.raises(ValueError, match="one prompt or 3 prompts"):
        reward(images, ["a", "b"], source=source)
    pairwise = reward.with_task("edit_pairwise_score")
    with pytest.raises(ValueError, match="needs other="):
        pairwise(images, "make it red", source=source)
    with pytest.raises(ValueError, match="task must be one of"):
        reward.with_task("edit_quality")


def test_loader_errors() -> None:
    backend = ScriptedBackend([])
    with pytest.raises(ValueError, match="backend= is used as is"):
        rk.load("unified-reward-2", weights="x", backend=backend)
    with pytest.raises(ValueError, match="server= runs the model elsewhere"):
        rk.load("unified-reward-2", server="http://127.0.0.1:9/v1", device="cuda")
    with pytest.raises(ValueError, match="only apply with server="):
        rk.load("unified-reward-edit", served_model="UnifiedReward")
    with pytest.raises(ValueError, match=r"backend= is used as is; drop \['logits_processor_factory'\]"):
        rk.load("unified-reward-edit", backend=backend, logits_processor_factory=list)
    served = rk.load("unified-reward-2", server="http://127.0.0.1:9/v1", served_model="UnifiedReward", timeout=5)
    assert type(served.backend).__name__ == "OpenAIChatBackend" and served.backend.served_model == "UnifiedReward"
    with pytest.raises(ValueError, match="prompt_variant"):
        UnifiedReward2(backend, prompt_variant="v1")
    with pytest.raises(ValueError, match="rank_parser must be one of"):
        UnifiedRewardEdit(backend, task="edit_pairwise_rank", rank_parser="regex")
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        rk.load("unified-reward-2", backend=backend)(rkt.random_images(1), "a", source=rkt.random_images(1))


# ---- end to end on tiny models (real TransformersBackend.generate) ----------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The two tiny folders; torch runs one thread meanwhile (restored after): on a loaded 2-core machine the
    pure-torch Gated-DeltaNet conv fallback of Qwen3.5 measured ~25x slower with 2 threads than with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rk-unified-reward")
    yield {"ur2": rkt.tiny_unified_reward_2(root / "ur2"), "edit": rkt.tiny_unified_reward_edit(root / "edit")}
    torch.set_num_threads(threads)


def _forced(kwargs: dict, text: str, **options):
    """Load with the answer forced to ``text`` (then EOS) through the real generate path."""
    tokenizer = rkt.tiny_qwen_tokenizer()
    factory = lambda: rkt.forced_answer_processor(tokenizer, text)  # noqa: E731
    return {**kwargs, "max_new_tokens": len(text) + 4, "logits_processor_factory": factory, **options}


def test_ur2_end_to_end_forced_and_random(tiny) -> None:
    images = rkt.random_images(2, 64, 64)
    forced = rk.load("unified-reward-2", **_forced(tiny["ur2"], UR2_ANSWER))
    out = forced.evaluate(images, "a photo of a cat")
    assert out.details["raw"] == [UR2_ANSWER] * 2
    torch.testing.assert_close(out.scores, torch.full((2,), UR2_MEAN), rtol=1e-6, atol=0)  # float32 of the mean
    assert out.details["coherence"].tolist() == [4.0, 4.0] and out.details["failure"] == [None, None]
    random = rk.load("unified-reward-2", **tiny["ur2"]).evaluate(images, ["a cat", "a dog"])
    assert random.scores.isnan().all() and all(isinstance(r, str) for r in random.details["raw"])
    assert all(reason and reason.split(":")[0] in ("no scores", "empty answer", "missing dimensions")
               for reason in random.details["failure"])


def test_ur2_end_to_end_thinking(tiny) -> None:
    images = rkt.random_images(1, 64, 64)
    thought = rk.load("unified-reward-2", **_forced(tiny["ur2"], "Style Score (1-5): 1</think>\n\n" + UR2_ANSWER,
                                                   enable_thinking=True))
    assert thought(images, "a cat").item() == pytest.approx(UR2_MEAN, rel=1e-6)
    cut = rk.load("unified-reward-2", **_forced(tiny["ur2"], UR2_ANSWER, enable_thinking=True))
    out = cut.evaluate(images, "a cat")
    assert out.scores.isnan().all() and out.details["failure"][0].startswith("unterminated thinking")


@pytest.mark.parametrize("task, answer, score, field", [
    ("edit_pointwise_score", '{\n\n"reasoning" : "ok",\n"score" : [20, 18],\n}', 19.0, ("overediting", 18.0)),
    ("edit_pairwise_rank", "Compared with Image 1, Image 2 is better.", 0.0, None),
    ("edit_pairwise_score", "Image 1: 7.5\nImage 2: -2.0", 9.5, ("image_2_score", -2.0)),
])
def test_edit_end_to_end_forced(tiny, task: str, answer: str, score: float, field) -> None:
    edited, source = rkt.random_images(2, 64, 64, seed=1), rkt.random_images(2, 48, 64, seed=2)
    context = {"source": source}
    if task != "edit_pointwise_score":
        context["other"] = rkt.random_images(2, 64, 48, seed=3)
    out = rk.load("unified-reward-edit", **_forced(tiny["edit"], answer, task=task)).evaluate(
        edited, ["make it red", "add a hat"], **context)
    assert out.scores.tolist() == [score, score] and out.details["parsed_ok"] == [True, True]
    if field is not None:
        assert out.details[field[0]].tolist() == [field[1]] * 2
    else:
        assert out.details["winner"] == [2, 2]


def test_edit_end_to_end_random_rows_are_nan(tiny) -> None:
    reward = rk.load("unified-reward-edit", **tiny["edit"])
    out = reward.evaluate(rkt.random_images(2, 64, 64), "make it red", source=rkt.random_images(2, 64, 64, seed=5))
    assert out.scores.isnan().all() and all(r is not None for r in out.details["failure"])
    assert out.details["editing_success"].isnan().all() and sum(reward.failure_counts.values()) == 2


def test_edit_through_an_openai_compatible_server(tiny, monkeypatch) -> None:
    """``server=``: the same prompts and parser over HTTP (a real local server around the tiny Qwen3-VL)."""
    from rewardkit.testing.vlm_server import serve_tiny_vlm

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the server process: one torch thread, as the fixture's

    answer = "Compared with Image 1, Image 2 is better."
    with serve_tiny_vlm(tiny["edit"]["weights"], forced_answer=answer, served_name="UnifiedReward") as url:
        reward = rk.load("unified-reward-edit", server=url, served_model="UnifiedReward", task="edit_pairwise_rank",
                         max_new_tokens=len(answer) + 4, timeout=120, retries=0)
        out = reward.evaluate(rkt.random_images(2, 64, 64), "make it red", source=rkt.random_images(2, 64, 64, seed=5),
                              other=rkt.random_images(2, 64, 64, seed=6))
    assert out.details["raw"] == [answer] * 2 and out.scores.tolist() == [0.0, 0.0]
    assert out.details["winner"] == [2, 2] and out.details["failure"] == [None, None]
