"""DiffSynth-Studio's ``UnifiedReward2Metric`` / ``UnifiedRewardEditMetric`` (``diffsynth/metrics/unified_reward_2.py``,
``unified_reward_edit.py``, fed7b18f) on rewardkit's ``unified-reward-2`` / ``unified-reward-edit`` judges.

    from rewardkit.compat.diffsynth_unified_reward import UnifiedRewardEditMetric   # was: from diffsynth.metrics ...
    metric = UnifiedRewardEditMetric.from_pretrained(device="cuda", torch_dtype=torch.bfloat16)
    metric.compute("make it red", [source, edited])                                   # -> [float | None]
    metric.evaluate("make it red", [[source, edit_1, edit_2]], task="edit_pairwise_rank")  # -> [dict]

Same ``from_pretrained`` arguments and default files (the ``UnifiedReward-2.0-qwen35-9b/`` and
``UnifiedReward-Edit-qwen3vl-8b/`` folders of ``DiffSynth-Studio/ImageMetrics``), the same input shapes (UR2: one
prompt x N images, N prompts x 1 image, else equal counts; UR-Edit: a flat list of PIL images is ONE sample
``[source, edited(, edited_2)]``, a list of such lists a batch) and the same result keys (reference §4.4, §5.4).
Scores follow upstream and rewardkit's parsers, not DiffSynth's choices:

* UR2 sends upstream's prompt with ``enable_thinking=False`` (DiffSynth: one extra sentence, template default) and
  a row missing a dimension is ``None`` (DiffSynth averages the ones found). DiffSynth's behaviour:
  ``from_pretrained(..., prompt_variant="diffsynth", enable_thinking=None, require_all=False)``.
* UR-Edit rank: "Compared with Image 1, Image 2 is better" ranks image 2 (DiffSynth: 1; ``rank_parser="diffsynth"``
  restores it) and a failed parse is ``None``, never 0 (DiffSynth's tie value). A score list with other than two
  numbers is ``None`` (DiffSynth takes the first ones); ``reasoning`` is read despite the trailing comma.
* Only the text after the last ``</think>`` is parsed; every dict also has ``raw`` (the answer) and ``failure``.
* ``task=None`` in ``evaluate`` / ``compute`` means ``from_pretrained``'s task (DiffSynth always uses its own
  ``"edit_pointwise_score"`` default there, so ``from_pretrained(task=...)`` had no effect).
* ``max_new_tokens=None`` means rewardkit's default (1024; DiffSynth's Edit default 256 can cut the pointwise
  reasoning before the score list). ``torch_dtype=None`` is the checkpoint's dtype on a GPU (DiffSynth: bf16).
* Rows are batched by the backend (DiffSynth generates one at a time); ``vram_limit`` is ignored; the processor
  is read from the weights folder (a ``processor_config`` elsewhere raises). Whether the ``ImageMetrics`` folders
  carry a ``config.json`` (which rewardkit needs) is unverified; ``model_config=ModelConfig(path=folder)`` or
  ``hf:CodeGoat24/...`` repos work either way.
"""

from __future__ import annotations

import math
import posixpath
import warnings
from typing import Any

import torch
from PIL import Image

from rewardkit.compat.diffsynth import (DEFAULT_DEVICE, IMAGE_METRICS_REPO, Metric, ModelConfig, _rewardkit_dtype,
                                       load_for)
from rewardkit.image_io import pil_to_tensor

__all__ = ["UnifiedReward2Metric", "UnifiedRewardEditMetric", "DIFFSYNTH_RANK_WINNERS"]

# diffsynth/models/unified_reward_edit.py _parse_rank strings, keyed by rewardkit's details["winner"]
DIFFSYNTH_RANK_WINNERS = {1: "Edited image 1", 2: "Edited image 2", 0: "Edited image 1 and 2 are equally good"}
_IMAGE_COUNTS = {"edit_pointwise_score": 2, "edit_pairwise_rank": 3, "edit_pairwise_score": 3}


def _folder_config(config: ModelConfig) -> ModelConfig:
    """``config`` naming the folder that holds its files (``"X/model-*.safetensors"`` -> ``"X/"``)."""
    pattern = config.origin_file_pattern
    if config.path is not None or pattern in (None, "", "./") or pattern.endswith("/"):
        return config
    folder = posixpath.dirname(pattern)
    return ModelConfig(model_id=config.model_id, origin_file_pattern=f"{folder}/" if folder else None,
                       download_source=config.download_source, local_model_path=config.local_model_path,
                       skip_download=config.skip_download)


def _weights(config: ModelConfig) -> str:
    """A local folder or an ``ms:`` / ``hf:`` folder spec (downloaded by the backend on first use)."""
    from pathlib import Path

    spec = _folder_config(config).to_spec()
    path = Path(spec)
    return str(path.parent) if path.is_file() else spec


def _nan_to_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _rows_of(details: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Per-row dicts from a ``RewardOutput.details`` (tensors to floats, NaN to ``None``)."""
    rows: list[dict[str, Any]] = [{} for _ in range(count)]
    for key, values in details.items():
        values = values.tolist() if torch.is_tensor(values) else list(values)
        for row, value in zip(rows, values):
            row[key] = _nan_to_none(value)
    return rows


class _JudgeMetric(Metric):
    """Shared ``from_pretrained`` and size-grouped scoring of the two UnifiedReward metrics."""

    @classmethod
    def from_pretrained(cls, model_config: ModelConfig | None = None,  # type: ignore[override]
                        processor_config: ModelConfig | None = None, torch_dtype: torch.dtype | None = None,
                        device: Any = DEFAULT_DEVICE, *, max_new_tokens: int | None = None,
                        processor_kwargs: dict | None = None, vram_limit: float | None = None,
                        **load_options: Any) -> Any:
        """Build the metric; ``load_options`` go to ``rewardkit.load`` (judge options such as ``prompt_variant``,
        ``enable_thinking``, ``task``, ``rank_parser``, and backend options such as ``batch_size``)."""
        if vram_limit is not None:
            warnings.warn(f"{cls.registry_name}: vram_limit is ignored by rewardkit", stacklevel=2)
        model_config = model_config or ModelConfig(model_id=IMAGE_METRICS_REPO, origin_file_pattern=cls.model_pattern)
        weights = _weights(model_config)
        if processor_config is not None and _weights(processor_config) != weights:
            raise ValueError(f"{cls.registry_name}: the processor is read from the weights folder {weights!r}; "
                             f"processor_config names {_weights(processor_config)!r}: copy the processor files "
                             "beside the weights or leave processor_config out")
        if max_new_tokens is not None:
            load_options["max_new_tokens"] = max_new_tokens
        if processor_kwargs:
            load_options["processor_kwargs"] = dict(processor_kwargs)
        dtype = _rewardkit_dtype(model_config.computation_dtype or torch_dtype)
        device = model_config.computation_device or device
        return cls(load_for(cls.__name__, cls.registry_name, weights, device=device, dtype=dtype, **load_options))

    @staticmethod
    def _run(reward: Any, rows: list[tuple[Image.Image, ...]], prompts: list[str], **keys: int) -> list[dict]:
        """Score ``rows`` of PIL images grouped by their sizes (a tensor batch needs one size); ``keys`` maps the
        judge's image arguments (``images``, ``source``, ``other``) to their position in a row."""
        results: list[dict] = [{} for _ in rows]
        groups: dict[tuple, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(tuple(image.size for image in row), []).append(index)
        for indices in groups.values():
            batch = {key: torch.stack([pil_to_tensor(rows[i][position]) for i in indices])
                     for key, position in keys.items()}
            with torch.no_grad():
                out = reward.evaluate(batch.pop("images"), [prompts[i] for i in indices], **batch)
            for i, row, score in zip(indices, _rows_of(out.details, len(indices)), out.scores.tolist()):
                results[i] = {**row, "score": _nan_to_none(score)}
        return results


class UnifiedReward2Metric(_JudgeMetric):
    """UnifiedReward 2.0: ``score`` = mean of Alignment / Coherence / Style (1-5), ``None`` when unparsed.

    ``evaluate(prompt, images)`` -> ``[{"alignment", "coherence", "style", "score", "raw", "failure", ...}]``;
    ``score`` / ``compute`` / ``forward`` -> ``[float | None]``. ``prompt=None`` is an empty caption, as DiffSynth.
    """

    registry_name = "unified-reward-2"
    model_pattern = "UnifiedReward-2.0-qwen35-9b/model-*.safetensors"
    processor_pattern = "UnifiedReward-2.0-qwen35-9b/"

    def evaluate(self, prompt: str | list[str] | None, images: Any) -> list[dict[str, Any]]:  # type: ignore[override]
        pils, prompts = self._pairs("" if prompt is None else prompt, images)
        return self._run(self.reward, [(image,) for image in pils], list(prompts or [""] * len(pils)), images=0)

    def score(self, prompt: str | list[str] | None, images: Any) -> list[float | None]:  # type: ignore[override]
        return [row["score"] for row in self.evaluate(prompt, images)]

    compute = forward = score


class UnifiedRewardEditMetric(_JudgeMetric):
    """UnifiedReward Edit with DiffSynth's result shapes per ``task``:

    * ``"edit_pointwise_score"``: ``score`` = mean(editing_success, overediting), each 0-25;
      dict keys ``editing_success``, ``overediting``, ``score``, ``reasoning``.
    * ``"edit_pairwise_rank"``: ``score`` 1 (edited image 1 wins), 2 (image 2 wins), 0 (stated tie), ``None``
      (unparsed); ``winner`` is DiffSynth's string (``DIFFSYNTH_RANK_WINNERS``) or ``None``.
    * ``"edit_pairwise_score"``: ``score`` = ``[image_1_score, image_2_score]`` (open scale).

    Each sample is ``[source, edited]`` (pointwise) or ``[source, edited_1, edited_2]`` (pairwise), PIL images or
    paths; a flat list is one sample, a list of lists a batch; prompts broadcast as DiffSynth's.
    """

    registry_name = "unified-reward-edit"
    model_pattern = "UnifiedReward-Edit-qwen3vl-8b/model-*.safetensors"
    processor_pattern = "UnifiedReward-Edit-qwen3vl-8b/"

    def _samples(self, prompt: Any, images: Any, task: str) -> tuple[list[tuple[Image.Image, ...]], list[str]]:
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        samples = [items] if not items or not isinstance(items[0], (list, tuple)) else [list(s) for s in items]
        prompts = [prompt] if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(prompts) == 1 and len(samples) > 1:
            prompts = prompts * len(samples)
        elif len(samples) == 1 and len(prompts) > 1:
            samples = samples * len(prompts)
        if len(prompts) != len(samples):
            raise ValueError(f"{self.reward.name}: expected one instruction, one sample, or as many instructions as "
                             f"samples, got {len(prompts)} instructions and {len(samples)} samples")
        count = _IMAGE_COUNTS[task]
        for i, sample in enumerate(samples):
            if len(sample) != count:
                raise ValueError(f"{self.reward.name}: task {task!r} takes {count} images per sample "
                                 f"([source, edited] or [source, edited_1, edited_2]), sample {i} has {len(sample)}")
        return [tuple(self._images(sample)) for sample in samples], ["" if p is None else p for p in prompts]

    def evaluate(self, prompt: str | list[str] | None, images: Any,  # type: ignore[override]
                 task: str | None = None) -> list[dict[str, Any]]:
        reward = self.reward.with_task(task or self.reward.task)
        rows, prompts = self._samples(prompt, images, reward.task)
        keys = {"source": 0, "images": 1, **({"other": 2} if len(rows[0]) == 3 else {})}
        results = self._run(reward, rows, prompts, **keys)
        for row in results:
            if reward.task == "edit_pairwise_rank":
                winner = row.get("winner")
                row["winner"], row["score"] = DIFFSYNTH_RANK_WINNERS.get(winner), winner
            elif reward.task == "edit_pairwise_score":
                row["score"] = [row.get("image_1_score"), row.get("image_2_score")]
        return results

    def score(self, prompt: str | list[str] | None, images: Any,  # type: ignore[override]
              task: str | None = None) -> list[Any]:
        return [row["score"] for row in self.evaluate(prompt, images, task=task)]

    compute = forward = score
