"""TRL 1.x ``reward_funcs``: ``f(prompts, completions, completion_ids, **kwargs) -> list[float | None]``.

TRL's GRPO / RLOO trainers train a causal LM; an image reward plugs in when the LM's text becomes an
image: a prompt-rewriting policy whose completions a frozen diffusers pipeline renders (``render=``),
or images made elsewhere (a ``rollout_func`` field or a dataset column, ``image_key=``).

Facts relied on (trl 1.16.0, ``trl/trainer/grpo_trainer.py``; reference/rl_integration.md §1.4):

* L1583-L1598, L1626-L1628: a keyword call, ``prompts=``, ``completions=``, ``completion_ids=`` plus
  every dataset column but ``prompt``/``completion``/``completion_ids`` (one value per row, repeated
  per generation), ``trainer_state``, ``log_extra(column, values)``, ``log_metric(name, value)``
  (and ``environments``). Rows are this rank's only; TRL gathers the rewards itself (L1681).
* L1630-L1636: one ``float | None`` per row; ``None`` becomes NaN ("not scorable").
* L2239-L2247: completions are strings, or ``[{"role": "assistant", "content": ...}]`` when the
  prompts are conversations (lists of messages).
* L564, ``trainer/utils.py`` L236 ``get_callable_name``: the log name is ``__name__`` (else the class
  name); metrics ``rewards/<name>/mean`` and ``rewards/<name>/std`` (L2821-L2825).
* ``trainer/utils.py`` L247 ``is_async_callable``, L749-L758, L1640-L1662: an instance whose
  ``__call__`` is ``async def`` is awaited on TRL's daemon event loop together with the other async
  reward functions (``asyncio.gather``), after the sync ones.
* L2400-L2403: columns named ``image`` / ``images`` are vision-model *inputs* to TRL.
"""

from __future__ import annotations

import asyncio
import functools
import math
from concurrent.futures import Executor
from typing import Any, Callable, Sequence

import torch

__all__ = ["TRLRewardFunc", "AsyncTRLRewardFunc", "as_reward_func", "pipeline_renderer", "message_text"]

PROMPT_FROM_PROMPT = "prompt"  # TRL's prompt: the text the policy was given
PROMPT_FROM_COMPLETION = "completion"  # the policy's output
_TRL_LOG_HOOKS = ("log_metric", "log_extra")
_TRL_VISION_COLUMNS = ("image", "images")  # grpo_trainer.py L2400-L2403


def message_text(item: Any, role: str) -> str:
    """The text of a plain or conversational TRL prompt / completion.

    Args:
        item: a string, one message dict, or a list of message dicts (``{"role", "content"}``, content a
            string or a list of blocks such as ``{"type": "text", "text": ...}``).
        role: whose message to take from a conversation: the last one with this role (``"user"`` for a
            prompt, ``"assistant"`` for a completion), else the last message.

    Returns:
        The text; the text blocks of a multi-block content joined with spaces.
    """
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        item = [item]
    if not isinstance(item, (list, tuple)) or not item or not all(isinstance(m, dict) for m in item):
        raise TypeError(f"expected a string or a list of {{'role', 'content'}} messages, got {type(item).__name__}")
    matching = [m for m in item if m.get("role") == role] or list(item)
    content = matching[-1].get("content", "")
    if isinstance(content, str):
        return content
    return " ".join(block.get("text", "") for block in content if isinstance(block, dict) and block.get("type") == "text")


def _slice_rows(kwargs: dict[str, Any], start: int, stop: int, rows: int) -> dict[str, Any]:
    """Per-row columns (lists or tensors of ``rows`` items) sliced to ``[start, stop)``; the rest as is."""
    def per_row(v: Any) -> bool:
        if isinstance(v, torch.Tensor):
            return v.ndim > 0 and v.shape[0] == rows
        return isinstance(v, (list, tuple)) and len(v) == rows

    return {k: v[start:stop] if per_row(v) else v for k, v in kwargs.items()}


def _column_images(name: str, key: str, column: Any) -> torch.Tensor:
    """A dataset / rollout column of images -> float ``(B, 3, H, W)``: a tensor, CHW tensors, or PIL/paths."""
    if isinstance(column, torch.Tensor):
        return column
    if isinstance(column, (list, tuple)) and column and all(isinstance(x, torch.Tensor) for x in column):
        return torch.stack(list(column))
    from rewardkit.image_io import to_tensor

    try:
        return to_tensor(list(column))
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name}: column {key!r} must hold one image per row: float (3, H, W) tensors in [0, 1], PIL "
            f"images or paths (or one (B, 3, H, W) tensor); {error}"
        ) from error


class TRLRewardFunc:
    """A TRL 1.x reward function around a RewardFn (build it with :func:`as_reward_func`).

    Calling it returns one ``float | None`` per row (NaN scores become ``None``). :meth:`score` returns
    the raw ``(B,)`` float32 scores and the reward's per-row details instead.
    """

    def __init__(self, reward: Any, render: Callable[..., torch.Tensor] | None, *, name: str,
                 image_key: str | None, prompt_from: str | None, batch_size: int | None, log_details: bool,
                 executor: Executor | None = None) -> None:
        self.reward = reward
        self.render = render
        self.__name__ = name
        self.image_key = image_key
        self.prompt_from = prompt_from
        self.batch_size = batch_size
        self.log_details = log_details
        self.executor = executor

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                 **kwargs: Any) -> list[float | None]:
        hooks = {k: kwargs.pop(k, None) for k in _TRL_LOG_HOOKS}
        scores, details = self.score(prompts, completions, **kwargs)
        return self._finish(scores, details, **hooks)

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> tuple[torch.Tensor, dict]:
        """Render (or read) the images and score them under ``torch.inference_mode()``.

        Args:
            prompts: ``B`` TRL prompts (strings or message lists).
            completions: ``B`` completions (strings or message lists).
            **kwargs: TRL's per-row columns and ``trainer_state``; forwarded to ``render``.

        Returns:
            ``(scores, details)``: float32 ``(B,)`` on CPU (NaN = not applicable) and the reward's
            per-row details (tensors ``(B,)`` or lists of ``B``), empty for rewards without ``evaluate``.
        """
        name, rows = self.__name__, len(prompts)
        if len(completions) != rows:
            raise ValueError(f"{name}: got {rows} prompts and {len(completions)} completions; TRL passes one "
                             "prompt per completion (prompts repeated per generation)")
        prompt_texts = [message_text(p, "user") for p in prompts]
        completion_texts = [message_text(c, "assistant") for c in completions]
        scored_texts = self._scored_texts(prompt_texts, completion_texts, kwargs, rows)
        step = self.batch_size or max(rows, 1)
        parts: list[tuple[torch.Tensor, dict]] = []
        with torch.inference_mode():
            for start in range(0, rows, step):
                stop = min(start + step, rows)
                images = self._images(prompt_texts[start:stop], completion_texts[start:stop],
                                      _slice_rows(kwargs, start, stop, rows), stop - start)
                texts = None if scored_texts is None else scored_texts[start:stop]
                parts.append(self._score_chunk(images, texts, stop - start))
        return _merge(parts, rows)

    def _scored_texts(self, prompts: list[str], completions: list[str], kwargs: dict, rows: int) -> list[str] | None:
        if self.prompt_from is None:
            return None
        if self.prompt_from == PROMPT_FROM_PROMPT:
            return prompts
        if self.prompt_from == PROMPT_FROM_COMPLETION:
            return completions
        column = kwargs.get(self.prompt_from)
        if not isinstance(column, (list, tuple)) or len(column) != rows:
            raise ValueError(f"{self.__name__}: prompt_from={self.prompt_from!r} names no column of {rows} rows; "
                             f"columns TRL passed: {sorted(kwargs)}. Add the column to the dataset or use "
                             f"prompt_from='prompt' / 'completion'")
        return [message_text(text, "user") for text in column]

    def _images(self, prompts: list[str], completions: list[str], kwargs: dict, rows: int) -> torch.Tensor:
        name = self.__name__
        if self.image_key is not None:
            if self.image_key not in kwargs:
                raise ValueError(f"{name}: image_key={self.image_key!r} is not among the columns TRL passed "
                                 f"({sorted(kwargs)}); add it to the dataset or return it from rollout_func")
            images = _column_images(name, self.image_key, kwargs[self.image_key])
        else:
            try:
                images = self.render(prompts, completions, **kwargs)
            except Exception as error:
                raise RuntimeError(f"{name}: render(prompts, completions, **kwargs) failed on {rows} rows: "
                                   f"{type(error).__name__}: {error}") from error
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] != rows:
            from rewardkit.errors import describe

            source = f"column {self.image_key!r}" if self.image_key is not None else "render"
            raise ValueError(f"{name}: {source} gave {describe(images)}; expected a float tensor ({rows}, 3, H, W) "
                             "in [0, 1], one image per completion (a diffusers pipeline: output_type='pt')")
        return images

    def _score_chunk(self, images: torch.Tensor, texts: list[str] | None, rows: int) -> tuple[torch.Tensor, dict]:
        parameter = next(iter(self.reward.parameters()), None) if hasattr(self.reward, "parameters") else None
        if parameter is not None:  # the reward's device, where its parameters are
            images = images.to(parameter.device)
        if hasattr(self.reward, "evaluate"):
            out = self.reward.evaluate(images, texts)
            scores, details = out.scores, dict(out.details)
        else:
            scores, details = self.reward(images, texts), {}
        scores = torch.as_tensor(scores)
        if scores.shape != (rows,):
            raise ValueError(f"{self.__name__}: the reward returned scores of shape {tuple(scores.shape)} for "
                             f"{rows} images; a RewardFn returns one score per image, shape ({rows},)")
        return scores.detach().float().cpu(), details

    def _finish(self, scores: torch.Tensor, details: dict, log_metric: Callable | None = None,
                log_extra: Callable | None = None) -> list[float | None]:
        values = [None if math.isnan(v) else v for v in scores.tolist()]
        if self.log_details and log_metric is not None:
            log_metric(f"rewards/{self.__name__}/frac_none", values.count(None) / max(len(values), 1))
            for key, column in details.items():
                if isinstance(column, torch.Tensor):
                    log_metric(f"rewards/{self.__name__}/{key}/mean", float(column.nanmean()))
        if self.log_details and log_extra is not None:
            for key, column in details.items():
                log_extra(f"{self.__name__}/{key}", column.tolist() if isinstance(column, torch.Tensor) else list(column))
        return values

    def __getstate__(self) -> dict[str, Any]:
        # Executors hold threads and locks; a pickled copy runs on the event loop's default executor.
        return {**self.__dict__, "executor": None}


class AsyncTRLRewardFunc(TRLRewardFunc):
    """The async variant: ``await f(...)`` scores in a worker thread (``executor``, else the loop's default).

    TRL awaits every async reward function together (``asyncio.gather``), so scoring overlaps with other
    async reward functions (remote judges, a second image reward) but not with the sync ones, which TRL
    runs first. Concurrent functions must not share a reward instance (per-instance caches, such as the
    CLIP prompt-embedding cache, are not thread-safe) nor a diffusers pipeline.
    """

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                       **kwargs: Any) -> list[float | None]:
        hooks = {k: kwargs.pop(k, None) for k in _TRL_LOG_HOOKS}
        job = functools.partial(self.score, prompts, completions, **kwargs)
        scores, details = await asyncio.get_running_loop().run_in_executor(self.executor, job)
        return self._finish(scores, details, **hooks)


def _merge(parts: list[tuple[torch.Tensor, dict]], rows: int) -> tuple[torch.Tensor, dict]:
    """The chunks' scores and details joined; details that are not one value per row are dropped."""
    details: dict[str, Any] = {}
    for key in parts[0][1] if parts else {}:
        columns = [chunk_details.get(key) for _, chunk_details in parts]
        if all(isinstance(c, torch.Tensor) and c.ndim == 1 for c in columns):
            details[key] = torch.cat([c.detach().float().cpu() for c in columns])
        elif all(isinstance(c, (list, tuple)) for c in columns):
            details[key] = [x for c in columns for x in c]
    scores = torch.cat([chunk_scores for chunk_scores, _ in parts]) if parts else torch.zeros(0)
    return scores, {key: column for key, column in details.items() if len(column) == rows}


def as_reward_func(reward: Any, render: Callable[..., torch.Tensor] | None = None, *, name: str | None = None,
                   image_key: str | None = None, prompt_from: str | None = PROMPT_FROM_PROMPT,
                   batch_size: int | None = None, log_details: bool = True, asynchronous: bool = False,
                   executor: Executor | None = None) -> TRLRewardFunc:
    """Wrap ``reward`` as a TRL 1.x ``reward_funcs`` entry (GRPOTrainer, RLOOTrainer, OnlineDPO).

    Args:
        reward: a RewardFn instance or a registry name (loaded with ``rk.load(name)``).
        render: ``render(prompts, completions, **kwargs) -> (B, 3, H, W)`` float in ``[0, 1]``, called
            with the plain texts (conversations reduced by :func:`message_text`) and TRL's per-row
            columns; e.g. :func:`pipeline_renderer`. Exactly one of ``render`` / ``image_key``.
        name: the log name (``rewards/<name>/mean``); default ``reward.name``.
        image_key: read the images from this per-row column (a dataset column or a ``rollout_func``
            field) instead of rendering; not ``image``/``images``, which TRL feeds to the policy.
        prompt_from: which text the images are scored against. ``"prompt"`` (default): TRL's prompt,
            i.e. for a prompt rewriter the ORIGINAL prompt, which the image of the rewritten prompt (the
            completion) must match. ``"completion"``: the completion itself. Any other string: a column
            holding the text (e.g. the raw user prompt when TRL's prompt wraps it in an instruction).
            ``None``: no prompt (rewards with ``requires_prompt=False``).
        batch_size: render and score at most this many rows at a time (memory bound); ``None``: all.
        log_details: when TRL passes ``log_metric`` / ``log_extra``, log ``rewards/<name>/frac_none``,
            ``rewards/<name>/<detail>/mean`` for numeric details (a composed reward's parts) and every
            detail as a completions-table column ``<name>/<detail>``.
        asynchronous: return an :class:`AsyncTRLRewardFunc` (``async def __call__``).
        executor: the async variant's thread pool; ``None``: the event loop's default executor.

    Returns:
        The callable; ``__name__`` is ``name``. Returns ``list[float | None]``, ``None`` for NaN rows.
    """
    if isinstance(reward, str):
        from rewardkit.registry import load

        reward = load(reward)
    if not callable(reward):
        raise TypeError(f"as_reward_func: expected a RewardFn or a registry name, got {type(reward).__name__}")
    if (render is None) == (image_key is None):
        raise ValueError("as_reward_func: pass exactly one of render= (turn completions into images) or "
                         "image_key= (a column that holds the images)")
    if render is not None and not callable(render):
        raise TypeError(f"as_reward_func: render must be callable(prompts, completions, **kwargs), "
                        f"got {type(render).__name__}; wrap a pipeline with pipeline_renderer(pipe)")
    if image_key in _TRL_VISION_COLUMNS:
        raise ValueError(f"as_reward_func: TRL treats the column {image_key!r} as vision-model input; store "
                         "the images to score under another name, e.g. image_key='rendered'")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"as_reward_func: batch_size must be >= 1 or None, got {batch_size}")
    if not asynchronous and executor is not None:
        raise ValueError("as_reward_func: executor= is used by the async variant only; pass asynchronous=True")
    cls = AsyncTRLRewardFunc if asynchronous else TRLRewardFunc
    return cls(reward, render, name=name or getattr(reward, "name", type(reward).__name__), image_key=image_key,
               prompt_from=prompt_from, batch_size=batch_size, log_details=log_details, executor=executor)


def pipeline_renderer(pipe: Any, *, text: str = PROMPT_FROM_COMPLETION, seed_key: str | None = None,
                      **call_kwargs: Any) -> Callable[..., torch.Tensor]:
    """A ``render`` that runs a diffusers text-to-image pipeline on the completions (or prompts).

    Args:
        pipe: a diffusers pipeline taking ``prompt``, ``generator`` and ``output_type="pt"``.
        text: ``"completion"`` (a prompt rewriter's output, default) or ``"prompt"``.
        seed_key: a per-row integer column: row ``i`` is sampled with
            ``torch.Generator(pipe.device).manual_seed(seed_i)``. Dataset columns repeat per generation,
            so the completions of one prompt share their noise and differ only by their text. ``None``:
            the pipeline's global RNG.
        **call_kwargs: passed to every pipeline call (``num_inference_steps``, ``height``, ...).

    Returns:
        ``render(prompts, completions, **kwargs) -> (B, 3, H, W)`` float32 in ``[0, 1]``.

    A pipeline is not thread-safe (its scheduler keeps per-call state): never let two async reward
    functions render with one pipeline; render once and score several rewards with ``rk.compose``
    (its parts are logged, see ``log_details``).
    """
    if text not in (PROMPT_FROM_PROMPT, PROMPT_FROM_COMPLETION):
        raise ValueError(f"pipeline_renderer: text must be 'completion' or 'prompt', got {text!r}")
    return functools.partial(_render_with_pipeline, pipe, text, seed_key, call_kwargs)  # picklable


def _render_with_pipeline(pipe: Any, text: str, seed_key: str | None, call_kwargs: dict, prompts: list[str],
                          completions: list[str], **kwargs: Any) -> torch.Tensor:
    options = dict(call_kwargs)
    if seed_key is not None:
        if seed_key not in kwargs:
            raise KeyError(f"seed_key={seed_key!r} is not among the columns {sorted(kwargs)}")
        device = torch.device(getattr(pipe, "device", "cpu"))
        options["generator"] = [torch.Generator(device).manual_seed(int(seed)) for seed in kwargs[seed_key]]
    texts = list(completions if text == PROMPT_FROM_COMPLETION else prompts)
    return pipe(prompt=texts, output_type="pt", **options).images.float().clamp(0.0, 1.0)
