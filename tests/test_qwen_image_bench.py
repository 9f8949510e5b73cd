"""Qwen-Image-Bench: prompt bytes, answer parsing and scoring, dims, resize, and the judge end to end.

Golden values: reference/vlm_family.md section 8.2 (template sha256) and section 6.3 (the Quality example).
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from PIL import Image

import rewardkit as rk
from rewardkit.rewards import qwen_image_bench as qib
from rewardkit.rewards import qwen_image_bench_checklist as ck
from rewardkit.vlm.requests import Completion

# (chars, sha256[:16]) of HEADER.format(prompt="a dog") + "<image>" + BODY, reference section 8.2.
USER_TEXT_HASHES = {
    "Quality": (1385, "b0194c11ba1ba45b"),
    "Aesthetics": (1689, "24224be4c9ebc18c"),
    "Alignment": (2699, "ed617713a98c4d62"),
    "Real-world Fidelity": (1868, "681665b116ef62a2"),
    "Creative Generation": (3958, "0fd6ab306db279f7"),
}
QUALITY_EXAMPLE = ('{"Realism": {"Physical Logic": {"score": 2}, "Material Texture": {"score": 1}}, "Detail": '
                   '{"Noise": {"score": 0}, "Edge Clarity": {"score": "N/A"}}, "Resolution": {"Resolution": {"score": 1}}}')


def _digest(text: str) -> tuple[int, str]:
    return len(text), hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ---- prompt bytes ----------------------------------------------------------------------------------------
def test_system_prompt_and_user_texts_match_reference_hashes() -> None:
    assert _digest(ck.SYSTEM_PROMPT) == (209, "654a1e24488b20c4")
    for level1, expected in USER_TEXT_HASHES.items():
        before, after = ck.user_text("a dog", level1)
        assert _digest(before + "<image>" + after) == expected, level1
    assert ck.user_text("{x} {}", "Quality")[0].startswith("# Text Prompt Used to Generate the Image\n{x} {}\n")


def test_checklist_has_56_facets_and_its_l3_to_l2_table() -> None:
    counts = {level1: sum(len(facets) for _, facets in groups) for level1, groups in ck.CHECKLIST.items()}
    assert counts == {"Quality": 6, "Aesthetics": 6, "Alignment": 16, "Real-world Fidelity": 8, "Creative Generation": 20}
    assert ck.LEVEL1_DIMS == tuple(USER_TEXT_HASHES)
    assert ck.L3_TO_L2["Aesthetics"]["Lighting & Atmosphere"] == "Lighting"
    assert ck.L3_TO_L2["Aesthetics"]["Composition"] == "Composition"
    assert ck.L3_TO_L2["Creative Generation"]["Composition"] == "Visual Storytelling"
    assert sum(len(table) for table in ck.L3_TO_L2.values()) == 56


def test_messages_are_system_string_then_header_image_body() -> None:
    image = Image.new("RGB", (8, 8))
    messages = ck.build_messages("a dog", image, "Alignment")
    assert messages[0] == {"role": "system", "content": ck.SYSTEM_PROMPT}
    kinds = [item["type"] for item in messages[1]["content"]]
    assert kinds == ["text", "image", "text"] and messages[1]["content"][1]["image"] is image
    assert messages[1]["content"][0]["text"] + "<image>" + messages[1]["content"][2]["text"] == \
        "".join(ck.user_text("a dog", "Alignment")[:1]) + "<image>" + ck.user_text("a dog", "Alignment")[1]


# ---- answer -> JSON ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    QUALITY_EXAMPLE,
    f"  {QUALITY_EXAMPLE}\n",
    f"reasoning {{not json}}\n</think>\n\n{QUALITY_EXAMPLE}",
    f"first </think> {{\"Realism\": 1}} more thoughts</think>{QUALITY_EXAMPLE}",
    f"</think>\n```json\n{QUALITY_EXAMPLE}\n```",
    f"</think>Here is my evaluation: {QUALITY_EXAMPLE} Done.",
])
def test_extract_json_reads_after_the_last_think_end(text: str) -> None:
    assert qib.extract_json(text)["Detail"]["Edge Clarity"] == {"score": "N/A"}


@pytest.mark.parametrize("text, reason", [
    (None, "no answer"),
    ("", "no JSON object in answer"),
    ("   \n", "no JSON object in answer"),
    ('</think>{"Realism": {"Physical Logic": {"score": 2}, "Material Tex', "no JSON object in answer"),  # truncated
    ("The image is fine. Score: 2", "no JSON object in answer"),  # malformed: no JSON
    ("</think>{'Realism': {'Noise': 1}}", "no JSON object in answer"),  # python, not JSON
    ("</think>[1, 2]", "no JSON object in answer: the JSON is a list"),
    ("</think>2", "no JSON object in answer: the JSON is a int"),
    ("</think>{}", "no JSON object in answer: the object is empty"),
    ('<think>I will answer {"Realism": {"Noise": {"score": 2}}} after', "unterminated <think> block"),
    ('</think>ok <think>then {"Realism": {"Noise": {"score": 2}}}', "unterminated <think> block"),
])
def test_extract_json_failures_say_why(text: str | None, reason: str) -> None:
    with pytest.raises(qib.AnswerError, match="^" + reason.replace("[", r"\[")):
        qib.extract_json(text)


# ---- repair, map, means ------------------------------------------------------------------------------------
def test_flat_answers_are_nested_by_the_checklist() -> None:
    nested, notes = qib.nest_answer({"Physical Logic": {"score": 2}, "Noise": {"score": 1}}, "Quality")
    assert nested == {"Realism": {"Physical Logic": {"score": 2}}, "Detail": {"Noise": {"score": 1}}} and notes == []
    nested, _ = qib.nest_answer({"Feature Mapping": {"score": 2}, "Made Up": {"score": 1}}, "Creative Generation")
    assert nested == {"Feature Matching": {"Feature Matching": {"score": 2}}, "Made Up": {"Made Up": {"score": 1}}}


def test_misplaced_facets_move_and_feature_mapping_is_renamed() -> None:
    answer = {"Detail": {"Physical Logic": {"score": 2}, "Noise": {"score": 0}}, "Realism": 5,
              "Odd": {"Made Up": {"score": 1}}}
    nested, notes = qib.nest_answer(answer, "Quality")
    assert nested == {"Realism": {"Physical Logic": {"score": 2}}, "Detail": {"Noise": {"score": 0}},
                      "Odd": {"Made Up": {"score": 1}}}
    assert notes == ["Quality/Realism: expected an object of facets, got int"]
    nested, _ = qib.nest_answer({"Imagination": {"Feature Mapping": {"score": 1}}}, "Creative Generation")
    assert nested == {"Feature Matching": {"Feature Matching": {"score": 1}}}


@pytest.mark.parametrize("raw, expected", [
    (0, 0.0), (1, 60.0), (2, 100.0), ("2", 100.0), (" 1 ", 60.0), (2.0, 100.0), ("N/A", None), ("n/a", None),
    (" N/a ", None),
])
def test_map_score_table(raw: object, expected: float | None) -> None:
    assert qib.map_score(raw) == expected


@pytest.mark.parametrize("raw", [3, -1, None, 1.5, 0.7, True, False, "high", "2.0", "", [2], {"score": 2}])
def test_map_score_rejects_everything_else(raw: object) -> None:
    with pytest.raises(qib.AnswerError, match="is not 0, 1, 2 or 'N/A'"):
        qib.map_score(raw)


def test_reference_quality_example_nested_means() -> None:
    result = qib.score_dimension(f"<think>hm</think>{QUALITY_EXAMPLE}", "Quality")
    assert result.failure is None and result.facet_failures == []
    assert result.level2 == {"Realism": 80.0, "Detail": 0.0, "Resolution": 60.0}
    assert result.level3["Detail"] == {"Noise": 0.0, "Edge Clarity": None}
    assert result.level1 == pytest.approx(140.0 / 3, abs=1e-12)


def test_bad_facets_are_excluded_and_listed_never_zero() -> None:
    text = '{"Realism": {"Physical Logic": {"score": 1.5}, "Material Texture": {"score": 2}}, "Detail": {"Noise": {"rating": 0}}}'
    result = qib.score_dimension(text, "Quality")
    assert result.failure is None and result.level1 == 100.0 and result.level2["Realism"] == 100.0
    assert math.isnan(result.level2["Detail"]) and math.isnan(result.level3["Realism"]["Physical Logic"])
    assert result.facet_failures == ["Quality/Realism/Physical Logic: facet value 1.5 is not 0, 1, 2 or 'N/A'",
                                     "Quality/Detail/Noise: no 'score' key in {\"rating\": 0}"]
    all_bad = qib.score_dimension('{"Noise": {"score": 7}}', "Quality")
    assert all_bad.failure.startswith("no valid facet score: Quality/Detail/Noise") and math.isnan(all_bad.level1)
    all_na = qib.score_dimension('{"Noise": {"score": "N/A"}, "Resolution": 1}', "Quality")
    assert all_na.failure is None and all_na.level1 == 60.0  # a bare value counts, as upstream
    only_na = qib.score_dimension('{"Noise": {"score": "N/A"}}', "Quality")
    assert only_na.failure is None and math.isnan(only_na.level1)


def test_score_row_total_is_mean_of_level1_and_failures_are_listed() -> None:
    texts = [QUALITY_EXAMPLE, '</think>{"Composition": {"score": 2}, "Color Harmony": {"score": 1}}', "garbage", None]
    dims = ["Quality", "Aesthetics", "Alignment", "Creative Generation"]
    row = qib.score_row(dims, texts, [None, None, None, "HTTP 500: boom"])
    assert row.score == pytest.approx((140.0 / 3 + 80.0) / 2, abs=1e-12)
    assert row.extra["parse_failures"] == ["Alignment", "Creative Generation"]
    assert row.reason.startswith("some dimensions failed: Alignment: no JSON object") and "HTTP 500: boom" in row.reason
    assert math.isnan(row.fields["Alignment"]) and math.isnan(row.fields["Real-world Fidelity"])
    assert row.extra["level2"]["Aesthetics"] == {"Composition": 100.0, "Color Harmony": 60.0}
    assert row.extra["level2"]["Alignment"] == {} and row.extra["dims"] == dims


def test_score_row_without_any_score_is_nan_with_reason() -> None:
    failed = qib.score_row(["Quality", "Aesthetics"], ["", "<think>still thinking"])
    assert math.isnan(failed.score) and failed.extra["parse_failures"] == ["Quality", "Aesthetics"]
    assert failed.reason.startswith("every dimension failed: Quality: no JSON object in answer")
    na = qib.score_row(["Quality"], ['{"Noise": {"score": "N/A"}}'])
    assert math.isnan(na.score) and na.reason.startswith("no applicable facet") and na.extra["parse_failures"] == []


# ---- dims and images ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    (None, ck.LEVEL1_DIMS),
    ("Alignment", ("Alignment",)),
    ("Quality, Real-world Fidelity,", ("Quality", "Real-world Fidelity")),
    ("Quality / Realism / Physical Logic; Aesthetics / Color Harmony / Color Harmony; Quality / Detail / Noise",
     ("Quality", "Aesthetics")),
    ("Creative Generation / Text Rendering; Alignment", ("Creative Generation", "Alignment")),
    ({"Aesthetics": [("Lighting", "Lighting & Atmosphere")]}, ("Aesthetics",)),
    (["Alignment", "Quality", "Alignment"], ("Alignment", "Quality")),
])
def test_parse_dims_forms(spec: object, expected: tuple[str, ...]) -> None:
    assert ck.parse_dims(spec) == expected


@pytest.mark.parametrize("spec, error, match", [
    ("quality", ValueError, "unknown level-1 dimension 'quality'"),
    ("Quality / Realism; Style / Color", ValueError, "unknown level-1 dimension 'Style'"),
    (["Quality", 3], ValueError, "unknown level-1 dimension 3"),
    ("", ValueError, "names no dimension"),
    ([], ValueError, "names no dimension"),
    (5, TypeError, "dims must be None, a str"),
])
def test_parse_dims_errors(spec: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ck.parse_dims(spec)


def test_dims_per_row_broadcasts_strings_and_splits_lists() -> None:
    assert ck.dims_per_row(None, 2) == [ck.LEVEL1_DIMS] * 2
    assert ck.dims_per_row("Quality, Alignment", 3) == [("Quality", "Alignment")] * 3
    assert ck.dims_per_row(["Quality", "Aesthetics / Lighting / Lighting & Atmosphere"], 2) == [("Quality",), ("Aesthetics",)]
    with pytest.raises(ValueError, match="expected 3 entries, got 2; .*dims='Quality, Alignment'"):
        ck.dims_per_row(["Quality", "Alignment"], 3)
    with pytest.raises(TypeError, match="one entry per image"):
        ck.dims_per_row(7, 1)


def test_prepare_image_resizes_only_above_1024_to_a_square() -> None:
    wide = Image.effect_noise((2048, 1024), 40).convert("RGB")
    resized = ck.prepare_image(wide)
    assert resized.size == (1024, 1024)
    assert resized.tobytes() == wide.resize((1024, 1024), Image.LANCZOS).tobytes()
    small = Image.new("RGB", (1024, 512), (1, 2, 3))
    assert ck.prepare_image(small).tobytes() == small.tobytes() and ck.prepare_image(small).size == (1024, 512)
    assert ck.prepare_image(wide, None).size == (2048, 1024)
    assert ck.prepare_image(Image.new("L", (4, 4)), 2).mode == "RGB"


# ---- the judge on a scripted backend -------------------------------------------------------------------------
class ScriptedBackend:
    """Answers each request from ``answers[(prompt, dimension)]``; records every ``generate`` call."""

    def __init__(self, answers: dict[tuple[str, str], str | None]) -> None:
        self.answers, self.calls = answers, []

    def generate(self, requests):  # type: ignore[no-untyped-def]
        self.calls.append(list(requests))
        out = []
        for request in requests:
            prompt = request.messages[1]["content"][0]["text"].split("\n")[1]
            text = self.answers[(prompt, request.meta["dimension"])]
            out.append(Completion(text) if text is not None else Completion(None, "timeout after 120 s"))
        return out


def test_judge_sends_every_image_dimension_pair_in_one_generate_call() -> None:
    answers = {("a dog", "Quality"): QUALITY_EXAMPLE, ("a dog", "Alignment"): '{"Color": {"score": 2}}',
               ("a cat", "Aesthetics"): "<think>no idea", ("a cat", "Quality"): '</think>{"Noise": {"score": 1}}'}
    backend = ScriptedBackend(answers)
    reward = rk.load("qwen-image-bench", backend=backend)
    images = torch.rand(2, 3, 1024, 2048, generator=torch.Generator().manual_seed(0))
    out = reward.evaluate(images, ["a dog", "a cat"], dims=["Quality, Alignment", "Aesthetics, Quality"])
    assert len(backend.calls) == 1 and len(backend.calls[0]) == 4
    first = backend.calls[0][0]
    assert first.settings.max_new_tokens == 4096 and first.settings.repetition_penalty == 1.05
    assert first.settings.enable_thinking is True
    assert [r.meta["dimension"] for r in backend.calls[0]] == ["Quality", "Alignment", "Aesthetics", "Quality"]
    assert all(r.images()[0].size == (1024, 1024) for r in backend.calls[0])
    expected = torch.tensor([(140.0 / 3 + 100.0) / 2, 60.0], dtype=torch.float32)
    assert torch.equal(out.scores, expected) and out.scores.dtype == torch.float32
    assert torch.equal(out.details["Quality"], torch.tensor([140.0 / 3, 60.0], dtype=torch.float32))
    assert out.details["Alignment"][0] == 100.0 and math.isnan(out.details["Alignment"][1])
    assert math.isnan(out.details["Aesthetics"][1]) and torch.isnan(out.details["Creative Generation"]).all()
    assert out.details["parse_failures"] == [[], ["Aesthetics"]]
    assert out.details["level2"][0]["Alignment"] == {"Attributes": 100.0}
    assert out.details["raw"][1] == ["<think>no idea", '</think>{"Noise": {"score": 1}}']
    assert out.details["failure"] == [None, None] and "unterminated <think>" in out.details["reason"][1]


def test_judge_rows_that_fail_entirely_are_nan_with_reason_and_full_details() -> None:
    answers = {("p", "Quality"): None, ("p", "Alignment"): None, ("q", "Quality"): "nothing", ("q", "Alignment"): ""}
    reward = rk.load("qwen-image-bench", backend=ScriptedBackend(answers))
    out = reward.evaluate(torch.rand(2, 3, 16, 16), ["p", "q"], dims="Quality, Alignment")
    assert torch.isnan(out.scores).all()
    assert out.details["failure"][0] == "generation failed: timeout after 120 s"
    assert out.details["failure"][1].startswith("every dimension failed: Quality: no JSON object in answer")
    assert out.details["parse_failures"] == [["Quality", "Alignment"]] * 2
    assert out.details["level2"][0] == {"Quality": {}, "Alignment": {}} and out.details["dims"][0] == ["Quality", "Alignment"]
    assert reward.failure_counts == {"generation failed": 1, "every dimension failed": 1}


def test_constructor_dims_apply_to_rows_without_dims() -> None:
    answers = {(p, d): '{"Color": {"score": 1}}' if d == "Alignment" else QUALITY_EXAMPLE
               for p in ("p", "q") for d in ck.LEVEL1_DIMS}
    backend = ScriptedBackend(answers)
    reward = rk.load("qwen-image-bench", backend=backend, dims="Alignment")
    out = reward.evaluate(torch.rand(2, 3, 8, 8), ["p", "q"], dims=[None, "Quality"])
    assert out.details["dims"] == [["Alignment"], ["Quality"]] and out.scores[0] == 60.0
    assert reward(torch.rand(1, 3, 8, 8), "p").item() == 60.0
    assert [r.meta["dimension"] for r in backend.calls[-1]] == ["Alignment"]
    assert "dims=('Alignment',)" in repr(reward)
    with pytest.raises(ValueError, match="unknown level-1 dimension 'Style'"):
        rk.load("qwen-image-bench", backend=backend, dims="Style")


def test_judge_bad_dims_and_load_options_raise_before_generating() -> None:
    backend = ScriptedBackend({})
    reward = rk.load("qwen-image-bench", backend=backend)
    with pytest.raises(ValueError, match="unknown level-1 dimension 'Realism'"):
        reward(torch.rand(1, 3, 8, 8), "p", dims="Realism")
    with pytest.raises(ValueError, match="expected 1 entries, got 2"):
        reward(torch.rand(1, 3, 8, 8), "p", dims=["Quality", "Alignment"])
    with pytest.raises(ValueError, match="needs a prompt"):
        reward(torch.rand(1, 3, 8, 8))
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['dim'\]; accepted: dims="):
        reward(torch.rand(1, 3, 8, 8), "p", dim="Quality")
    assert backend.calls == []
    with pytest.raises(ValueError, match=r"backend= is used as is; drop \['weights'\]"):
        rk.load("qwen-image-bench", weights="x", backend=backend)
    with pytest.raises(ValueError, match=r"server= runs the model elsewhere; \['device'\]"):
        rk.load("qwen-image-bench", server="http://127.0.0.1:9/v1", device="cpu")
    with pytest.raises(ValueError, match="resize_long_edge must be an int"):
        rk.load("qwen-image-bench", backend=backend, resize_long_edge=0)
    entry = rk.registry.get_entry("qwen-image-bench")
    assert entry.score_range == (0.0, 100.0) and not entry.differentiable and entry.generative


# ---- end to end on a tiny random qwen3_5 through TransformersBackend.generate ------------------------------------
class AnswerPerRequest:
    """Forces each row of a ``generate`` batch to answer ``answers[(prompt, dimension)]`` then EOS.

    The prompt and dimension are read back from the row's (left-padded) prompt tokens; the factory makes
    one instance per ``generate`` call, so the prompt length is the length at the first call.
    """

    def __init__(self, tokenizer, answers: dict[tuple[str, str], str]) -> None:  # type: ignore[no-untyped-def]
        self.tokenizer, self.answers, self.start, self.targets = tokenizer, answers, -1, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start < 0:
            self.start = input_ids.shape[1]
            for row in input_ids:
                text = self.tokenizer.decode(row, skip_special_tokens=False)
                prompt = text.split("# Text Prompt Used to Generate the Image\n")[1].split("\n")[0]
                dimension = text.split("# Evaluation Dimension\n")[1].split("\n")[0]
                ids = self.tokenizer(self.answers[(prompt, dimension)], add_special_tokens=False)["input_ids"]
                self.targets.append([*ids, self.tokenizer.eos_token_id])
        step = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, float("-inf"))
        for i, target in enumerate(self.targets):
            forced[i, target[min(step, len(target) - 1)]] = 0.0
        return forced


@pytest.fixture(scope="module")
def tiny_qib(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The tiny judge's ``rk.load`` kwargs; torch runs one thread meanwhile (restored after): on this loaded
    2-core machine the forced-answer test measured 78 s with 2 threads and 4.7 s with 1."""
    import rewardkit.testing as rkt

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield rkt.tiny_qwen_image_bench(tmp_path_factory.mktemp("rk-qib"))
    torch.set_num_threads(threads)


# The tiny tokenizer is byte-level (one token per character), so prompts are 1.4k-4.2k tokens long and the
# prefill dominates: the tiny tests use the two shortest checklists (Quality, Aesthetics).
def test_tiny_judge_forced_answers_give_the_exact_total(tiny_qib: dict) -> None:
    from transformers import AutoTokenizer, LogitsProcessorList

    tokenizer = AutoTokenizer.from_pretrained(tiny_qib["weights"])
    answers = {("a dog", "Quality"): 'ok</think>{"Physical Logic":{"score":2},"Noise":{"score":0}}',
               ("a cat", "Aesthetics"): '</think>{"Composition":{"score":1},"Lighting":{"score":"N/A"}}',
               ("a cat", "Quality"): '</think>{"Detail":{"Physical Logic":{"score":2}}}'}
    factory = lambda: LogitsProcessorList([AnswerPerRequest(tokenizer, answers)])  # noqa: E731
    reward = rk.load("qwen-image-bench", **{**tiny_qib, "max_new_tokens": qib.MAX_NEW_TOKENS},
                     logits_processor_factory=factory, batch_size=3)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = reward.evaluate(images, ["a dog", "a cat"], dims=["Quality", "Aesthetics, Quality"])
    assert out.details["raw"] == [[answers[("a dog", "Quality")]],
                                  [answers[("a cat", "Aesthetics")], answers[("a cat", "Quality")]]]
    assert torch.equal(out.scores, torch.tensor([(100.0 + 0.0) / 2, (60.0 + 100.0) / 2]))
    level2 = out.details["level2"][1]
    assert level2["Quality"] == {"Realism": 100.0}  # the misplaced facet moved to its group
    assert level2["Aesthetics"]["Composition"] == 60.0 and math.isnan(level2["Aesthetics"]["Lighting"])
    assert out.details["level3"][1]["Aesthetics"]["Lighting"] == {"Lighting": None}  # an unknown facet keeps its name
    rendered = reward.backend.processor.apply_chat_template(
        reward.build_requests([Image.new("RGB", (64, 64))], ["a dog"], dims="Quality")[0][0].messages,
        tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert rendered.startswith("<|im_start|>system\n" + ck.SYSTEM_PROMPT) and rendered.endswith("assistant\n<think>\n")
    assert "# Generated Image\n<|vision_start|><|image_pad|><|vision_end|>\n\n# Evaluation Dimension\nQuality\n" in rendered


def test_tiny_judge_random_answers_are_nan_with_reasons(tiny_qib: dict) -> None:
    import rewardkit.testing as rkt

    reward = rk.load("qwen-image-bench", **tiny_qib)
    out = reward.evaluate(rkt.random_images(2, 64, 64), "a red cube", dims="Quality")
    assert torch.isnan(out.scores).all() and [len(texts) for texts in out.details["raw"]] == [1, 1]
    assert all(reason.startswith("every dimension failed: Quality: ") for reason in out.details["failure"])
    assert out.details["parse_failures"] == [["Quality"]] * 2 and torch.isnan(out.details["Quality"]).all()
    assert reward.failure_counts == {"every dimension failed": 2}


def test_tiny_judge_through_a_local_openai_compatible_server(tiny_qib: dict, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from rewardkit.testing.vlm_server import serve_tiny_vlm

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the server subprocess: one thread, as the fixture's
    answer = 'hm</think>{"Physical Logic":{"score":2},"Noise":{"score":1}}'
    with serve_tiny_vlm(tiny_qib["weights"], forced_answer=answer, served_name="qib") as url:
        reward = rk.load("qwen-image-bench", server=url, dims="Quality", timeout=300.0)
        assert reward.backend.served_model is None  # read from /v1/models on first use
        out = reward.evaluate(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)), ["a", "b"])
        payload = reward.backend.payload(reward.build_requests([Image.new("RGB", (8, 8))], ["a"])[0][0])
    assert torch.equal(out.scores, torch.tensor([80.0, 80.0])) and out.details["raw"] == [[answer], [answer]]
    assert reward.backend.served_model == "qib" and payload["model"] == "qib"
    assert payload["max_tokens"] == 4096 and payload["temperature"] == 0 and payload["repetition_penalty"] == 1.05
    assert payload["chat_template_kwargs"] == {"enable_thinking": True}
    assert payload["messages"][0] == {"role": "system", "content": ck.SYSTEM_PROMPT}
