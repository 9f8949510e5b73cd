"""``GenerativeJudge``: the base of every reward that asks a VLM a question and parses its answer.

Subclasses (UnifiedReward 2.0, UnifiedReward Edit, Qwen-Image-Bench) supply two pure steps:
``build_requests`` (images and prompts -> chat requests, one list per row) and ``parse_row`` (the
answers of one row -> :class:`ParsedAnswer`). The base validates the images, converts them to PIL with
exact uint8 quantisation, sends every row's requests to the backend in ONE ``generate`` call (so the
backend can batch across rows; DiffSynth-Studio's ``diffsynth/metrics/{unified_reward_2,
unified_reward_edit,qwen_image_bench}.py`` generate one sample at a time), regroups the answers, parses
them and returns NaN with a reason for every row that could not be scored, never 0.

Reference: /work/shared/reference/vlm_family.md §2 (the shared DiffSynth generation recipe) and §9.5.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from rewardkit.protocols import Reward, RewardOutput
from rewardkit.vlm.requests import ChatRequest, Completion, GenerationBackend, check_messages

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["ParsedAnswer", "GenerativeJudge", "tensor_to_pil", "failure_kind"]

logger = logging.getLogger(__name__)
_UINT8_MAX = 255  # 8-bit full scale
_GENERATION_FAILED = "generation failed"
_PARSER_RAISED = "parser raised"


@dataclass
class ParsedAnswer:
    """What a judge read out of one row's answer(s).

    Attributes:
        score: the row's score; NaN when the answer could not be parsed.
        fields: named sub-scores (e.g. ``{"alignment": 3.8}``); NaN entries allowed.
        reason: ``None`` when parsed fine, else why not (e.g. ``"no 'score' list in answer"``). A
            reason beside a finite score is a note (e.g. a partial parse) and does not fail the row.
        extra: other per-row values (e.g. ``{"winner": 2, "parsed_ok": True}``).
    """

    score: float
    fields: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def failure_kind(reason: str) -> str:
    """The key a failure reason is counted under: the text before the first ``": "`` (or all of it)."""
    return reason.split(": ", 1)[0]


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float ``(B, 3, H, W)`` images in ``[0, 1]`` -> ``B`` RGB PIL images, ``round(x * 255)`` per value.

    The quantisation is exact: ``k / 255`` becomes ``k``, so images that came from uint8 files
    (``rewardkit.image_io``: ``uint8 / 255``) round-trip unchanged. Validation is the caller's job
    (``rewardkit.errors.check_images``).
    """
    from PIL import Image

    array = (images.detach().to("cpu", torch.float32) * _UINT8_MAX).round().to(torch.uint8)
    array = array.permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(row) for row in array]  # uint8 (H, W, 3) -> mode "RGB"


class GenerativeJudge(Reward):
    """Base class of rewards that generate text with a VLM and parse it (``differentiable = False``).

    Subclasses set ``name``, ``higher_is_better``, ``requires_prompt``, optionally ``field_names``
    (sub-scores always present in ``details``, NaN-filled) and ``multi_request`` (True when a row
    needs several requests, e.g. Qwen-Image-Bench's five dimensions), and implement
    :meth:`build_requests` and :meth:`parse_row`.

    ``evaluate(images, prompts, **context)`` returns ``RewardOutput(scores, details)`` with
    ``scores`` float32 ``(B,)`` on ``images.device`` (NaN where a row failed) and ``details``:
    ``"raw"`` (the answer texts: ``list[str | None]``, or a list per row when ``multi_request``),
    ``"failure"`` (``list[str | None]``: the reason a row is NaN), ``"reason"`` (every parser note),
    one float32 ``(B,)`` tensor per field, and one ``B``-list per ``extra`` key.

    Attributes:
        backend: the :class:`~rewardkit.vlm.requests.GenerationBackend` that answers requests.
        failure_counts: ``Counter`` of failed rows by :func:`failure_kind` of their reason, since
            construction (or the last ``failure_counts.clear()``).
    """

    differentiable = False
    field_names: tuple[str, ...] = ()
    multi_request: bool = False

    def __init__(self, backend: GenerationBackend) -> None:
        super().__init__()
        if not callable(getattr(backend, "generate", None)):
            raise TypeError(f"{self.name}: backend must have a generate(requests) method (a GenerationBackend, "
                            f"e.g. rewardkit.vlm.TransformersBackend or OpenAIChatBackend), got {type(backend).__name__}")
        self.backend = backend
        self.failure_counts: Counter[str] = Counter()

    # ---- the two steps a judge implements ----------------------------------------------------------
    def build_requests(self, images: list[Image.Image], prompts: list[str] | None,
                       **context: Any) -> list[list[ChatRequest]]:
        """Chat requests per row: one inner list per image (length 1 unless ``multi_request``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_requests(images, prompts, **context)")

    def parse_row(self, completions: list[Completion], row_context: dict[str, Any]) -> ParsedAnswer:
        """Parse one row's answers (in request order).

        Called only when at least one of the row's requests produced text; in a multi-request row
        some ``completions`` may still have ``text=None`` (with ``error``). ``row_context`` is
        :meth:`row_contexts`' dict for the row plus ``"requests"`` (the row's :class:`ChatRequest`s).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement parse_row(completions, row_context)")

    def row_contexts(self, batch_size: int, prompts: list[str] | None, **context: Any) -> list[dict[str, Any]]:
        """Per-row context for :meth:`parse_row`: ``index``, ``prompt`` and the caller's ``**context``.

        A context value that is a list or tuple of ``batch_size`` items is split per row; anything
        else is given to every row as is.
        """
        rows = []
        for i in range(batch_size):
            row = {key: (value[i] if isinstance(value, (list, tuple)) and len(value) == batch_size else value)
                   for key, value in context.items()}
            row.update(index=i, prompt=None if prompts is None else prompts[i])
            rows.append(row)
        return rows

    # ---- the shared machinery ------------------------------------------------------------------------
    def score(self, images: torch.Tensor, prompts: list[str] | None, **context: Any) -> RewardOutput:
        return self._judge(tensor_to_pil(images), prompts, images.device, **context)

    def evaluate_pil(self, images: Any, prompts: str | list[str] | None = None, **context: Any) -> RewardOutput:
        """Judge PIL images or image files as they are (any sizes; no float round trip): the CLI's path.

        Args:
            images: a PIL image, a path, or a list of them.
            prompts: one string (broadcast) or one per image; ``None`` for judges without prompts.
            **context: as for :meth:`evaluate` (e.g. ``dims=`` for Qwen-Image-Bench).

        Returns:
            ``RewardOutput`` as :meth:`evaluate`, scores on the CPU.
        """
        from rewardkit.errors import check_prompts
        from rewardkit.image_io import as_rgb_images

        items = images if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError(f"{self.name}: expected at least one image, got an empty list")
        pil_images = as_rgb_images(items)
        prompt_list = check_prompts(self.name, prompts, len(pil_images), self.requires_prompt)
        return self._judge(pil_images, prompt_list, torch.device("cpu"), **context)

    def score_pil(self, images: Any, prompts: str | list[str] | None = None, **context: Any) -> torch.Tensor:
        """``evaluate_pil(...).scores``: float32 ``(B,)``."""
        return self.evaluate_pil(images, prompts, **context).scores

    def _judge(self, pil_images: list[Image.Image], prompts: list[str] | None, device: torch.device,
               **context: Any) -> RewardOutput:
        per_row = self._checked_requests(self.build_requests(pil_images, prompts, **context), len(pil_images))
        flat = [request for row in per_row for request in row]
        completions = self._generate(flat)
        grouped, start = [], 0
        for row in per_row:
            grouped.append(completions[start:start + len(row)])
            start += len(row)
        contexts = self.row_contexts(len(pil_images), prompts, **context)
        answers = [self._parse(rows, {**ctx, "requests": reqs}) for rows, ctx, reqs in zip(grouped, contexts, per_row)]
        return self._output(answers, grouped, device)

    def _checked_requests(self, per_row: Any, batch_size: int) -> list[list[ChatRequest]]:
        where = f"{self.name}: build_requests"
        if not isinstance(per_row, list) or len(per_row) != batch_size:
            raise RuntimeError(f"{where} must return a list of {batch_size} lists of ChatRequest (one per image), "
                               f"got {type(per_row).__name__} of length {len(per_row) if hasattr(per_row, '__len__') else '?'}")
        for i, row in enumerate(per_row):
            if not isinstance(row, list) or not row or not all(isinstance(r, ChatRequest) for r in row):
                raise RuntimeError(f"{where}: row {i} must be a non-empty list of ChatRequest, got {row!r:.120}")
            if len(row) != 1 and not self.multi_request:
                raise RuntimeError(f"{where}: row {i} has {len(row)} requests; set multi_request = True on "
                                   f"{type(self).__name__} for judges that ask several questions per image")
            for request in row:
                check_messages(request.messages, where)
        return per_row

    def _generate(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        completions = self.backend.generate(requests)
        if not isinstance(completions, list) or len(completions) != len(requests) \
                or not all(isinstance(c, Completion) for c in completions):
            raise RuntimeError(f"{self.name}: backend {type(self.backend).__name__}.generate must return a list of "
                               f"{len(requests)} Completion objects (one per request, same order), got {completions!r:.200}")
        return completions

    def _parse(self, completions: list[Completion], row_context: dict[str, Any]) -> ParsedAnswer:
        if all(c.text is None for c in completions):
            errors = "; ".join(dict.fromkeys(str(c.error or "no error given") for c in completions))
            return ParsedAnswer(math.nan, {}, f"{_GENERATION_FAILED}: {errors}")
        try:
            answer = self.parse_row(completions, row_context)
        except Exception as error:  # a parser bug must not lose the batch; the row says why it is NaN
            logger.exception("%s: parse_row raised on row %s", self.name, row_context.get("index"))
            return ParsedAnswer(math.nan, {}, f"{_PARSER_RAISED}: {type(error).__name__}: {error}")
        if not isinstance(answer, ParsedAnswer):
            raise RuntimeError(f"{self.name}: parse_row must return a ParsedAnswer, got {type(answer).__name__}")
        if math.isnan(answer.score) and answer.reason is None:
            answer.reason = "unparseable answer (the parser gave no reason)"
        return answer

    def _output(self, answers: list[ParsedAnswer], grouped: list[list[Completion]],
                device: torch.device) -> RewardOutput:
        scores = torch.tensor([float(a.score) for a in answers], dtype=torch.float32)
        failures = [a.reason if math.isnan(a.score) else None for a in answers]
        raw: list[Any] = [[c.text for c in row] for row in grouped]
        details: dict[str, Any] = {"raw": raw if self.multi_request else [row[0] for row in raw],
                                   "failure": failures, "reason": [a.reason for a in answers]}
        names = list(dict.fromkeys([*self.field_names, *(k for a in answers for k in a.fields)]))
        for key in names:
            values = [float(a.fields.get(key, math.nan)) for a in answers]
            details[key] = torch.tensor(values, dtype=torch.float32, device=device)
        for key in dict.fromkeys(k for a in answers for k in a.extra):
            if key not in details:
                details[key] = [a.extra.get(key) for a in answers]
        self._count(failures)
        return RewardOutput(scores=scores.to(device), details=details)

    def _count(self, failures: list[str | None]) -> None:
        batch = Counter(failure_kind(reason) for reason in failures if reason is not None)
        if batch:
            self.failure_counts.update(batch)
            summary = ", ".join(f"{kind} x{count}" for kind, count in batch.most_common())
            logger.warning("%s: %d of %d rows could not be scored (NaN): %s", self.name, sum(batch.values()),
                           len(failures), summary)
