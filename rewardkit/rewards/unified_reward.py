"""UnifiedReward 2.0 (``unified-reward-2``) and UnifiedReward Edit (``unified-reward-edit``): greedy VLM judges.

Upstream: ``CodeGoat24/UnifiedReward`` (``inference_qwen/UnifiedReward-2.0-inference/point_score_ACS_image_generation.py``,
``UnifiedReward-Edit/*.py``, ``vllm_qwen/vllm_request.py``); DiffSynth-Studio ``diffsynth/metrics/{unified_reward_2,
unified_reward_edit}.py`` is the seed API (``rewardkit.compat.diffsynth_unified_reward``). Facts, deviations and
unverified points: reference/vlm_family.md §4, §5, §9. Prompts and parsers: ``unified_reward_prompts``.

Both judges send one user turn (images first, then the text; no system turn) and parse the greedy answer.
Rows are batched across the whole call by the backend (DiffSynth generates one sample at a time). Every row
that cannot be scored is NaN with its reason in ``details["failure"]``; ``details["parsed_ok"]`` says which
rows parsed. Scores (higher is better for ``images``):

* ``unified-reward-2``: mean of the Alignment, Coherence and Style scores (1-5, as the model writes them);
  ``details["alignment" | "coherence" | "style"]`` ``(B,)``.
* ``unified-reward-edit``, ``task=``:
  * ``"edit_pointwise_score"`` (default): mean of editing success and overediting (each 0-25; averaging is
    DiffSynth's choice, upstream defines none); ``details["editing_success" | "overediting"]``.
  * ``"edit_pairwise_rank"``: 1.0 when ``images`` (Edited Image 1) wins over ``other=`` (Edited Image 2), 0.0
    when ``other`` wins, 0.5 for a stated tie; ``details["winner"]`` 1 / 2 / 0 (tie) / None (failed).
  * ``"edit_pairwise_score"``: ``s1 - s2``, the open-scale score of ``images`` minus that of ``other``;
    ``details["image_1_score" | "image_2_score"]``.
  The instruction is the prompt; ``source=`` (the unedited images) is required, ``other=`` for the pairwise
  tasks; each is float ``(B, 3, H, W)`` in ``[0, 1]`` with one row per edited image (sizes may differ from
  ``images``). Image order in the chat: ``[source, images]`` or ``[source, images, other]``, as upstream.

Upstream's client (``vllm_qwen/vllm_request.py``) sends JPEG-q95 images to its vLLM server; ``server=...,
image_format="jpeg"`` does the same (the default PNG is lossless). Unverified without the real checkpoints
(reference §10): the qwen35 chat template's thinking default, whether ``</think>`` survives decoding with
``skip_special_tokens=True``, and the exact wording of rank / pairwise-score answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rewardkit.errors import check_images
from rewardkit.rewards.unified_reward_prompts import (
    EDIT_TASKS,
    RANK_PARSERS,
    UR2_FIELDS,
    UR2_VARIANTS,
    edit_prompt,
    parse_edit_pairwise_score,
    parse_edit_pointwise,
    parse_edit_rank,
    parse_ur2,
    ur2_prompt,
)
from rewardkit.vlm.judge import GenerativeJudge, ParsedAnswer, tensor_to_pil
from rewardkit.vlm.requests import ChatRequest, Completion, GenerationBackend, GenerationSettings

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = ["UnifiedReward2", "UnifiedRewardEdit", "load_unified_reward_2", "load_unified_reward_edit",
           "UR2_DEFAULT_WEIGHTS", "EDIT_DEFAULT_WEIGHTS", "UR2_MAX_NEW_TOKENS", "EDIT_MAX_NEW_TOKENS"]

UR2_DEFAULT_WEIGHTS = "hf:CodeGoat24/UnifiedReward-2.0-qwen35-9b"  # upstream HF (reference §4.1)
EDIT_DEFAULT_WEIGHTS = "hf:CodeGoat24/UnifiedReward-Edit-qwen3vl-8b"  # upstream HF (reference §5.1)
UR2_MAX_NEW_TOKENS = 1024  # DiffSynth unified_reward_2.py default; a non-thinking answer is ~30 tokens
# DiffSynth's 256 can cut the pointwise reasoning before the score list (reference §5.2, §9.3: use >= 512).
EDIT_MAX_NEW_TOKENS = 1024
_EDIT_FIELDS = {"edit_pointwise_score": ("editing_success", "overediting"), "edit_pairwise_rank": (),
                "edit_pairwise_score": ("image_1_score", "image_2_score")}
_PAIRWISE = ("edit_pairwise_rank", "edit_pairwise_score")


def _messages(images: list[Image.Image], text: str) -> list[dict]:
    """One user turn: every image first, in order, then the text (upstream's order; no system turn)."""
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": text}]}]


def _no_context(name: str, context: dict[str, Any], accepted: str) -> None:
    if context:
        raise TypeError(f"{name}: unexpected keyword arguments {sorted(context)}; accepted: {accepted}")


class UnifiedReward2(GenerativeJudge):
    """UnifiedReward 2.0 pointwise image scoring: mean of Alignment / Coherence / Style (1-5).

    Args:
        backend: a ``GenerationBackend`` serving a UnifiedReward 2.0 checkpoint.
        prompt_variant: ``"upstream"`` (CodeGoat24's text, default) or ``"diffsynth"`` (one extra sentence).
        enable_thinking: chat-template thinking; ``False`` as upstream serves the qwen35 checkpoints,
            ``None`` = the template's default (DiffSynth's behaviour; reference §4.2).
        max_new_tokens: generation cap (raise it when thinking is on).
        require_all: a row missing a dimension is NaN (default); ``False`` averages the ones found (DiffSynth).
    """

    name = "unified-reward-2"
    higher_is_better = True
    requires_prompt = True
    field_names = UR2_FIELDS
    context_keys = frozenset()

    def __init__(self, backend: GenerationBackend, *, prompt_variant: str = "upstream",
                 enable_thinking: bool | None = False, max_new_tokens: int = UR2_MAX_NEW_TOKENS,
                 require_all: bool = True) -> None:
        super().__init__(backend)
        if prompt_variant not in UR2_VARIANTS:
            raise ValueError(f"{self.name}: prompt_variant must be one of {UR2_VARIANTS}, got {prompt_variant!r}")
        self.prompt_variant, self.require_all = prompt_variant, bool(require_all)
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, enable_thinking=enable_thinking)

    def build_requests(self, images: list[Image.Image], prompts: list[str] | None,
                       **context: Any) -> list[list[ChatRequest]]:
        """One request per image: ``[image, UR2 prompt(caption)]``."""
        _no_context(self.name, context, "images and prompts only")
        return [[ChatRequest(_messages([image], ur2_prompt(prompt, self.prompt_variant)), self.settings)]
                for image, prompt in zip(images, prompts or [""] * len(images))]

    def parse_row(self, completions: list[Completion], row_context: dict[str, Any]) -> ParsedAnswer:
        return parse_ur2(completions[0].text or "", thinking=self.settings.enable_thinking is True,
                         require_all=self.require_all)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prompt_variant={self.prompt_variant!r}, settings={self.settings}"


class UnifiedRewardEdit(GenerativeJudge):
    """UnifiedReward Edit: instruction-following of an edit, pointwise or against a second edit.

    Call as ``reward(edited, instructions, source=source_images[, other=second_edits])`` (see the module
    docstring for the score of each task).

    Args:
        backend: a ``GenerationBackend`` serving a UnifiedReward Edit checkpoint.
        task: ``"edit_pointwise_score"`` (default), ``"edit_pairwise_rank"`` or ``"edit_pairwise_score"``.
        enable_thinking: ``False`` (as upstream serves the qwen35 variant; Qwen3-VL templates ignore it) or
            ``None`` for the template's default.
        max_new_tokens: generation cap.
        rank_parser: ``"fixed"`` (default: the stated verdict) or ``"diffsynth"`` (DiffSynth's first-match regexes,
            which read "Compared with Image 1, Image 2 is better" as image 1).
    """

    name = "unified-reward-edit"
    higher_is_better = True
    requires_prompt = True
    context_keys = frozenset({"source", "other"})

    def __init__(self, backend: GenerationBackend, *, task: str = "edit_pointwise_score",
                 enable_thinking: bool | None = False, max_new_tokens: int = EDIT_MAX_NEW_TOKENS,
                 rank_parser: str = "fixed") -> None:
        super().__init__(backend)
        if task not in EDIT_TASKS:
            raise ValueError(f"{self.name}: task must be one of {EDIT_TASKS}, got {task!r}")
        if rank_parser not in RANK_PARSERS:
            raise ValueError(f"{self.name}: rank_parser must be one of {RANK_PARSERS}, got {rank_parser!r}")
        self.task, self.rank_parser, self.field_names = task, rank_parser, _EDIT_FIELDS[task]
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, enable_thinking=enable_thinking)

    def with_task(self, task: str) -> UnifiedRewardEdit:
        """The same judge (same backend and settings) for another ``task``."""
        if task == self.task:
            return self
        return UnifiedRewardEdit(self.backend, task=task, enable_thinking=self.settings.enable_thinking,
                                 max_new_tokens=self.settings.max_new_tokens, rank_parser=self.rank_parser)

    def _extra_images(self, key: str, value: Any, batch_size: int) -> list[Image.Image]:
        """Validate ``source=`` / ``other=`` (one row per edited image) and convert them to PIL."""
        if value is None:
            what = "the unedited source images" if key == "source" else "the second edited images (Edited Image 2)"
            raise ValueError(f"{self.name} (task {self.task!r}) needs {key}= : {what}, a float tensor "
                             f"({batch_size}, 3, H, W) in [0, 1]; call reward(edited, instructions, {key}=...)")
        check_images(f"{self.name} ({key}=)", value)
        if value.shape[0] != batch_size:
            raise ValueError(f"{self.name}: {key}= must hold one image per edited image: expected {batch_size} rows, "
                             f"got {value.shape[0]}; repeat one image with {key}.expand({batch_size}, -1, -1, -1)")
        return tensor_to_pil(value)

    def build_requests(self, images: list[Image.Image], prompts: list[str] | None, *,
                       source: torch.Tensor | None = None, other: torch.Tensor | None = None,
                       **context: Any) -> list[list[ChatRequest]]:
        """One request per row: ``[source, edited(, other)]`` images, then the task prompt with the instruction."""
        pairwise = self.task in _PAIRWISE
        _no_context(self.name, context, "source=" + (" and other=" if pairwise else ""))
        sources = self._extra_images("source", source, len(images))
        if pairwise:
            rows = list(zip(sources, images, self._extra_images("other", other, len(images))))
        elif other is not None:
            raise ValueError(f"{self.name}: other= is only used by the pairwise tasks {_PAIRWISE}; task is "
                             f"{self.task!r} (load with task='edit_pairwise_rank' to compare two edits)")
        else:
            rows = list(zip(sources, images))
        instructions = prompts or [""] * len(images)
        return [[ChatRequest(_messages(list(row), edit_prompt(text, self.task)), self.settings)]
                for row, text in zip(rows, instructions)]

    def parse_row(self, completions: list[Completion], row_context: dict[str, Any]) -> ParsedAnswer:
        text, thinking = completions[0].text or "", self.settings.enable_thinking is True
        if self.task == "edit_pointwise_score":
            return parse_edit_pointwise(text, thinking=thinking)
        if self.task == "edit_pairwise_rank":
            return parse_edit_rank(text, thinking=thinking, rank_parser=self.rank_parser)
        return parse_edit_pairwise_score(text, thinking=thinking)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, task={self.task!r}, settings={self.settings}"


def _backend(name: str, default_weights: str, weights: Any, server: str | None, backend: GenerationBackend | None,
             options: dict[str, Any]) -> GenerationBackend:
    from rewardkit.vlm.build import build_backend

    return build_backend(name, default_weights=default_weights, weights=weights, server=server, backend=backend,
                         **options)


_UR2_OPTIONS = ("prompt_variant", "enable_thinking", "max_new_tokens", "require_all")
_EDIT_OPTIONS = ("task", "enable_thinking", "max_new_tokens", "rank_parser")


def load_unified_reward_2(weights: Any = None, device: Any = None, dtype: Any = None, server: str | None = None,
                          served_model: str | None = None, backend: GenerationBackend | None = None,
                          **options: Any) -> UnifiedReward2:
    """Registry factory of ``unified-reward-2``.

    Args:
        weights: a local HF folder, ``"hf:owner/repo"`` or ``"ms:owner/repo[/folder/]"``; ``None`` =
            ``CodeGoat24/UnifiedReward-2.0-qwen35-9b``. Any UnifiedReward 2.0 variant (qwen3vl, qwen2.5-vl) loads.
        device, dtype: where and how the local model runs (``"bf16"`` for the 9B model on a GPU).
        server: an OpenAI-compatible ``/v1`` URL (vLLM / SGLang) instead of local weights.
        served_model: the server's model name (upstream serves ``"UnifiedReward"``); None asks ``/v1/models``.
        backend: any ``GenerationBackend``, used as is.
        **options: the judge's (``prompt_variant``, ``enable_thinking``, ``max_new_tokens``, ``require_all``);
            the rest go to ``rewardkit.vlm.build.build_backend`` (local: ``device_map``, ``batch_size``,
            ``model_class``, ``processor_kwargs``, ``logits_processor_factory``; server: ``api_key``,
            ``max_concurrency``, ``timeout``, ``retries``, ``backoff``, ``image_format``).
    """
    judge = {k: options.pop(k) for k in _UR2_OPTIONS if k in options}
    options.update(device=device, dtype=dtype, served_model=served_model)
    made = _backend("unified-reward-2", UR2_DEFAULT_WEIGHTS, weights, server, backend, options)
    return UnifiedReward2(made, **judge).freeze()


def load_unified_reward_edit(weights: Any = None, device: Any = None, dtype: Any = None, server: str | None = None,
                             served_model: str | None = None, backend: GenerationBackend | None = None,
                             **options: Any) -> UnifiedRewardEdit:
    """Registry factory of ``unified-reward-edit`` (arguments as :func:`load_unified_reward_2`).

    ``weights=None`` = ``CodeGoat24/UnifiedReward-Edit-qwen3vl-8b``; judge options: ``task``,
    ``enable_thinking``, ``max_new_tokens``, ``rank_parser``.
    """
    judge = {k: options.pop(k) for k in _EDIT_OPTIONS if k in options}
    options.update(device=device, dtype=dtype, served_model=served_model)
    made = _backend("unified-reward-edit", EDIT_DEFAULT_WEIGHTS, weights, server, backend, options)
    return UnifiedRewardEdit(made, **judge).freeze()
