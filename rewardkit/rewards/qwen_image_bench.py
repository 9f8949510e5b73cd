"""Qwen-Image-Bench (Q-Judger): a Qwen3.5-architecture VLM that fills one 0/1/2/N-A checklist per dimension.

Upstream: ``QwenLM/Qwen-Image-Bench`` (``judge.py``, ``score_utils.py``), as carried by DiffSynth-Studio
``diffsynth/models/qwen_image_bench.py`` and ``diffsynth/metrics/qwen_image_bench.py`` (fed7b18f). Facts:
reference/vlm_family.md section 6. Per image and per level-1 dimension the judge gets the system prompt, the
generation prompt, the image (resized to exactly 1024x1024 with LANCZOS when its long edge exceeds 1024)
and that dimension's checklist, thinks (``enable_thinking=True``), and answers with a JSON checklist that is
read after the last ``</think>``. Facets map 0/1/2 -> 0/60/100 and "N/A" -> excluded; level-3 -> level-2 ->
level-1 -> total are plain means of what is left. Generation is greedy with ``repetition_penalty=1.05`` and
up to 4096 new tokens; every (image, dimension) pair of a batch goes to the backend in ONE ``generate`` call.

Which dimensions: all five by default (DiffSynth's default, which is *not* the benchmark protocol), or
``rk.load(..., dims=...)``. The benchmark evaluates only the level-1 dimensions named in each prompt's
``dims_en`` metadata: pass it per row, ``reward(images, prompts, dims=[row["dims_en"] for row in rows])``.

Deviations from upstream/DiffSynth, all on malformed answers only: a facet value other than 0/1/2 (ints,
integral floats, digit strings) or "N/A" is a facet failure (NaN, excluded from the means, listed in
``facet_failures``) where upstream truncates with ``int()`` (1.5 -> 60, true -> 60, 0.7 -> 0); a non-object
or empty JSON answer, an answer ending inside ``<think>``, or a dimension with no valid facet is a dimension
failure (``parse_failures``); a row with nothing left to average is NaN with a reason (DiffSynth: 0.0).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from rewardkit.rewards.qwen_image_bench_checklist import (
    L3_RENAME, L3_TO_L2, LEVEL1_DIMS, RESIZE_LONG_EDGE, build_messages, dims_per_row, parse_dims, prepare_image,
)
from rewardkit.vlm.judge import GenerativeJudge, ParsedAnswer
from rewardkit.vlm.requests import ChatRequest, Completion, GenerationBackend, GenerationSettings

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from rewardkit.protocols import RewardOutput

__all__ = ["QwenImageBench", "AnswerError", "DimensionResult", "load", "map_score", "extract_json", "nest_answer",
           "score_dimension", "score_row", "SCORE_MAP", "MAX_NEW_TOKENS", "REPETITION_PENALTY"]

SCORE_MAP = {0: 0.0, 1: 60.0, 2: 100.0}  # upstream score_utils.py SCORE_MAP: Fail / Pass / Excel
NOT_APPLICABLE = "n/a"  # compared case-insensitively, as upstream's raw_score.upper() == "N/A"
THINK_START, THINK_END = "<think>", "</think>"
MAX_NEW_TOKENS = 4096  # DiffSynth from_pretrained(max_new_tokens=4096); upstream swift --max_new_tokens 4096
REPETITION_PENALTY = 1.05  # DiffSynth generate(repetition_penalty=1.05); upstream --repetition_penalty 1.05
DEFAULT_WEIGHTS = "hf:Qwen/Qwen-Image-Bench"  # also ms:Qwen/Qwen-Image-Bench (DiffSynth's default source)
MODEL_CLASS = "Qwen3_5ForConditionalGeneration"  # model_type qwen3_5 (a Qwen3.6-27B fine-tune), reference 6.1


class AnswerError(ValueError):
    """An answer that cannot be read; the message is the reason recorded for the dimension or facet."""


# ---- answers -> scores (pure) ------------------------------------------------------------------------
def map_score(raw: Any) -> float | None:
    """A facet value -> its score: 0 / 1 / 2 -> 0.0 / 60.0 / 100.0, ``"N/A"`` (any case) -> ``None`` (excluded).

    Integral floats (``2.0``) and digit strings (``"2"``) count. Raises :class:`AnswerError` for anything
    else (``3``, ``1.5``, ``True``, ``None``, ``"high"``), where upstream would truncate or drop it silently.
    """
    if isinstance(raw, str):
        text = raw.strip()
        if text.lower() == NOT_APPLICABLE:
            return None
        if text in ("0", "1", "2"):
            return SCORE_MAP[int(text)]
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool) and raw in SCORE_MAP:
        return SCORE_MAP[int(raw)]
    raise AnswerError(f"facet value {raw!r:.40} is not 0, 1, 2 or 'N/A'")


def extract_json(text: str | None) -> dict[str, Any]:
    """The JSON object of an answer: the text after the last ``</think>``, else its outermost ``{...}`` span.

    Raises:
        AnswerError: no answer, an answer that ends inside ``<think>``, no decodable JSON, or JSON that is
            not an object.
    """
    if text is None:
        raise AnswerError("no answer")
    end = text.rfind(THINK_END)
    body = (text[end + len(THINK_END):] if end >= 0 else text).strip()
    if THINK_START in body:
        raise AnswerError("unterminated <think> block: the answer was cut off while reasoning; raise max_new_tokens")
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        start, stop = body.find("{"), body.rfind("}")
        if start < 0 or stop < start:
            raise AnswerError(f"no JSON object in answer: {body[-80:]!r}") from None
        try:
            value = json.loads(body[start:stop + 1])
        except json.JSONDecodeError as error:
            raise AnswerError(f"no JSON object in answer: {error}") from None
    if not isinstance(value, dict):
        raise AnswerError(f"no JSON object in answer: the JSON is a {type(value).__name__}")
    if not value:
        raise AnswerError("no JSON object in answer: the object is empty")
    return value


def nest_answer(answer: dict[str, Any], level1: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Repair an answer into ``{level2: {level3: value}}`` (upstream ``fix_score_json``).

    A flat answer (first value an object with ``"score"``) is grouped by the checklist; otherwise each
    facet moves to the level-2 group the checklist gives it. Unknown facets keep the model's group (flat:
    their own name). ``Feature Mapping`` is renamed ``Feature Matching``. Returns the nested answer and a
    note per group that was not an object (dropped, as upstream does).
    """
    to_l2, rename = L3_TO_L2.get(level1, {}), L3_RENAME.get(level1, {})
    nested: dict[str, dict[str, Any]] = {}
    first = next(iter(answer.values()))
    if isinstance(first, dict) and "score" in first:
        for facet, value in answer.items():
            facet = rename.get(facet, facet)
            nested.setdefault(to_l2.get(facet, facet), {})[facet] = value
        return nested, []
    dropped = []
    for group, facets in answer.items():
        if not isinstance(facets, dict):
            dropped.append(f"{level1}/{group}: expected an object of facets, got {type(facets).__name__}")
            continue
        for facet, value in facets.items():
            facet = rename.get(facet, facet)
            nested.setdefault(to_l2.get(facet, group), {})[facet] = value
    return nested, dropped


@dataclass
class DimensionResult:
    """One level-1 dimension of one image.

    Attributes:
        level1: mean of the finite level-2 scores, 0-100; NaN when none (all N/A, or ``failure``).
        level2: ``{level2: mean of its valid facets}``; NaN where none.
        level3: ``{level2: {level3: score}}``, ``None`` for "N/A", NaN for an invalid value.
        failure: why the dimension could not be scored; ``None`` if it was.
        facet_failures: ``"level1/level2/level3: reason"`` per invalid facet (excluded from the means).
    """

    level1: float = math.nan
    level2: dict[str, float] = field(default_factory=dict)
    level3: dict[str, dict[str, float | None]] = field(default_factory=dict)
    failure: str | None = None
    facet_failures: list[str] = field(default_factory=list)


def _mean(values: Sequence[float | None]) -> float:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def score_dimension(text: str | None, level1: str) -> DimensionResult:
    """Parse and score one answer for ``level1`` (upstream ``compute_dimension_score`` after repair)."""
    try:
        nested, notes = nest_answer(extract_json(text), level1)
    except AnswerError as error:
        return DimensionResult(failure=str(error))
    result = DimensionResult(facet_failures=notes)
    for group, facets in nested.items():
        scores = result.level3.setdefault(group, {})
        for facet, value in facets.items():
            try:
                if isinstance(value, dict) and "score" not in value:
                    raise AnswerError(f"no 'score' key in {json.dumps(value)[:40]}")
                scores[facet] = map_score(value["score"] if isinstance(value, dict) else value)
            except AnswerError as error:
                scores[facet] = math.nan
                result.facet_failures.append(f"{level1}/{group}/{facet}: {error}")
        result.level2[group] = _mean(list(scores.values()))
    result.level1 = _mean(list(result.level2.values()))
    valid = [s for group in result.level3.values() for s in group.values() if s is None or not math.isnan(s)]
    if not valid:
        result.failure = "no valid facet score: " + "; ".join(result.facet_failures or ["no facets"])
    return result


def score_row(level1s: Sequence[str], texts: Sequence[str | None],
              errors: Sequence[str | None] | None = None) -> ParsedAnswer:
    """One image's answers (one per dimension, same order) -> total (mean of finite level-1 scores).

    ``fields`` holds the five level-1 scores (NaN when not asked, failed or all N/A); ``extra`` holds
    ``level2`` / ``level3`` (``{level1: ...}``; ``{}`` for failed dims), ``parse_failures`` (level-1 names),
    ``facet_failures`` and ``dims``. The score is NaN with a reason when no dimension has a score.
    """
    errors = list(errors) if errors is not None else [None] * len(texts)
    results: dict[str, DimensionResult] = {}
    for level1, text, error in zip(level1s, texts, errors):
        results[level1] = (DimensionResult(failure=f"generation failed: {error or 'no answer'}") if text is None
                           else score_dimension(text, level1))
    failed = [d for d, r in results.items() if r.failure is not None]
    total = _mean([r.level1 for r in results.values()])
    notes = "; ".join(f"{d}: {results[d].failure}" for d in failed)
    if math.isnan(total):
        reason = f"every dimension failed: {notes}" if failed else "no applicable facet: every facet was N/A"
    else:
        reason = f"some dimensions failed: {notes}" if failed else None
    extra = {
        "level2": {d: ({} if r.failure else r.level2) for d, r in results.items()},
        "level3": {d: ({} if r.failure else r.level3) for d, r in results.items()},
        "parse_failures": failed,
        "facet_failures": [note for r in results.values() for note in r.facet_failures],
        "dims": list(results),
    }
    fields = {d: (results[d].level1 if d in results else math.nan) for d in LEVEL1_DIMS}
    return ParsedAnswer(score=total, fields=fields, reason=reason, extra=extra)


# ---- the reward ----------------------------------------------------------------------------------------
class QwenImageBench(GenerativeJudge):
    """Qwen-Image-Bench total score, 0-100 (higher is better), from one judge answer per (image, dimension).

    ``reward(images, prompts, dims=None)``: ``images`` float ``(B, 3, H, W)`` in ``[0, 1]``; one prompt per
    image; ``dims`` per ``dims_per_row`` (rows without: the constructor's ``dims``; the benchmark protocol is
    each prompt's ``dims_en``). ``evaluate`` details: one ``(B,)`` tensor per level-1 name (NaN when not
    asked, failed or all N/A), and ``B``-lists ``level2`` / ``level3`` (``{level1: {level2: score}}`` /
    ``{level1: {level2: {level3: score | None}}}``), ``parse_failures`` (level-1 names), ``facet_failures``,
    ``dims``, ``raw`` (the answers, one list per row in ``dims`` order), ``failure`` / ``reason``.
    Not differentiable.

    Args:
        backend: a :class:`~rewardkit.vlm.requests.GenerationBackend` serving the Q-Judger weights.
        max_new_tokens: answer budget, thinking included (upstream: 4096).
        resize_long_edge: images whose long edge exceeds it become exactly this square (LANCZOS, aspect
            ratio not kept, as upstream); ``None`` keeps every image as it is.
        dims: the dimensions of rows that get none at call time, one ``parse_dims`` spec (default all five).
    """

    name = "qwen-image-bench"
    higher_is_better = True
    requires_prompt = True
    multi_request = True
    field_names = LEVEL1_DIMS
    context_keys = frozenset({"dims"})

    def __init__(self, backend: GenerationBackend, *, max_new_tokens: int = MAX_NEW_TOKENS,
                 resize_long_edge: int | None = RESIZE_LONG_EDGE, dims: Any = None) -> None:
        super().__init__(backend)
        if resize_long_edge is not None and (isinstance(resize_long_edge, bool)
                                             or not isinstance(resize_long_edge, int) or resize_long_edge < 1):
            raise ValueError(f"{self.name}: resize_long_edge must be an int >= 1 or None, got {resize_long_edge!r}")
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, repetition_penalty=REPETITION_PENALTY,
                                           enable_thinking=True)
        self.resize_long_edge = resize_long_edge
        self.dims = parse_dims(dims)

    def build_requests(self, images: list[Image.Image], prompts: list[str] | None, dims: Any = None,
                       **context: Any) -> list[list[ChatRequest]]:
        """One request per (image, level-1 dimension), in ``dims`` order; the image is prepared once per row."""
        if context:
            raise TypeError(f"{self.name}: unexpected keyword arguments {sorted(context)}; accepted: dims= (one "
                            "spec per image, e.g. each prompt's dims_en, or one spec for all)")
        rows, per_row = [], dims_per_row(dims, len(images), self.dims)
        for image, prompt, level1s in zip(images, prompts or [""] * len(images), per_row):
            image = prepare_image(image, self.resize_long_edge)
            rows.append([ChatRequest(build_messages(prompt, image, level1), self.settings, meta={"dimension": level1})
                         for level1 in level1s])
        return rows

    def parse_row(self, completions: list[Completion], row_context: dict[str, Any]) -> ParsedAnswer:
        """Score one row's answers with :func:`score_row`; the dimensions come from the requests' ``meta``."""
        level1s = [request.meta["dimension"] for request in row_context["requests"]]
        return score_row(level1s, [c.text for c in completions], [c.error for c in completions])

    def _judge(self, pil_images: list[Image.Image], prompts: list[str] | None, device: torch.device,
               **context: Any) -> RewardOutput:
        output = super()._judge(pil_images, prompts, device, **context)
        # Rows whose every generation failed are not parsed: give them the same per-dimension details.
        for i, level1s in enumerate(dims_per_row(context.get("dims"), len(output.scores), self.dims)):
            empty = {"level2": {d: {} for d in level1s}, "level3": {d: {} for d in level1s},
                     "parse_failures": list(level1s), "facet_failures": [], "dims": list(level1s)}
            for key, value in empty.items():
                column = output.details.setdefault(key, [None] * len(output.scores))
                if column[i] is None:
                    column[i] = value
        return output

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, settings={self.settings}, resize_long_edge={self.resize_long_edge}, "
                f"dims={self.dims}")


def load(weights: Any = None, device: Any = None, dtype: Any = None, *, backend: GenerationBackend | None = None,
         server: str | None = None, served_model: str | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
         resize_long_edge: int | None = RESIZE_LONG_EDGE, dims: Any = None,
         **backend_options: Any) -> QwenImageBench:
    """Build the Qwen-Image-Bench reward (``rk.load("qwen-image-bench", ...)``).

    One source: ``weights`` (a local HF folder or ``"hf:"`` / ``"ms:owner/repo"``; ``None`` = the 27 B
    ``hf:Qwen/Qwen-Image-Bench``, ~55 GB in bf16) run by ``TransformersBackend(device=, dtype=,
    **backend_options)``; or ``server="http://host:8000/v1"`` (vLLM / SGLang, the practical choice for training)
    with ``served_model`` (default: the server's first ``/v1/models`` id) and the client's ``backend_options``
    (``max_concurrency``, ``timeout``, ``retries``, ``image_format``, ...); or any ``backend=``. ``max_new_tokens``, ``resize_long_edge``, ``dims``: :class:`QwenImageBench`.

    Raises:
        ValueError: several sources, or options that the chosen source does not take.
    """
    from rewardkit.vlm.build import build_backend

    backend_options.setdefault("model_class", MODEL_CLASS)
    backend = build_backend(QwenImageBench.name, default_weights=DEFAULT_WEIGHTS, weights=weights, server=server,
                            backend=backend, device=device, dtype=dtype, served_model=served_model, **backend_options)
    return QwenImageBench(backend, max_new_tokens=max_new_tokens, resize_long_edge=resize_long_edge, dims=dims)
