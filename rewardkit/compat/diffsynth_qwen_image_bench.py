"""DiffSynth-Studio's ``QwenImageBenchMetric`` (``diffsynth/metrics/qwen_image_bench.py``, fed7b18f) on rewardkit's
``qwen-image-bench`` judge.

    from rewardkit.compat.diffsynth_qwen_image_bench import QwenImageBenchMetric  # was: from diffsynth.metrics ...
    metric = QwenImageBenchMetric.from_pretrained(device="cuda", torch_dtype=torch.bfloat16)
    metric.compute("a dog", [image_1, image_2])                          # -> [total 0-100 | nan, ...]
    metric.evaluate("a dog", image, dimensions="Quality / Realism / Physical Logic")  # -> [dict]

Same ``from_pretrained`` arguments and defaults (``Qwen/Qwen-Image-Bench``, ``max_new_tokens=4096``,
``resize_long_edge=1024``), the same pairing (1 prompt x N images, N prompts x 1 image, else equal counts;
``prompt=None`` is an empty prompt), the same ``dimensions`` forms (reference/vlm_family.md section 6.4: ``None``
= all five, one name, a comma list, a ``dims_en`` string, a dict, a list of names = ONE set for every sample, a
list holding any non-string = one set PER sample) and the same result keys (``total_score``, ``level1_scores``,
``level2_scores``, ``level3_scores``, ``raw_scores``, ``raw_outputs``, ``parse_failures``). Differences:

* ``compute`` / ``score`` / ``forward`` give **NaN** for an image with no scored dimension, where DiffSynth gives
  0.0 (a real score); ``evaluate`` keeps DiffSynth's ``total_score=None`` there.
* A facet value other than 0/1/2/"N/A" (e.g. 1.5, true) is excluded and listed in ``facet_failures`` (DiffSynth
  truncates it with ``int()``); a dimension whose answer has no valid facet, or ends inside ``<think>``, is in
  ``parse_failures`` (DiffSynth: ``level1_scores`` None, not listed, or parses braces from the reasoning).
* A ``dims_en`` item without ``/`` is read as a level-1 name (DiffSynth ignores it).
* Each dict also has ``facet_failures`` and ``failure`` (why ``total_score`` is None); ``raw_outputs`` is
  ``None`` for a dimension whose generation failed.
* Every (image, dimension) pair of a call goes to the backend at once, batched (DiffSynth: one at a time);
  ``vram_limit`` is ignored; the processor is read from the weights folder (a different ``processor_config``
  raises); ``torch_dtype=None`` is the checkpoint's dtype on a GPU and float32 on CPU (DiffSynth: bf16).
"""

from __future__ import annotations

import math
import posixpath
import warnings
from pathlib import Path
from typing import Any

import torch

from rewardkit.compat.diffsynth import DEFAULT_DEVICE, Metric, ModelConfig, _rewardkit_dtype, _with_sidecar, load_for
from rewardkit.image_io import pil_to_tensor
from rewardkit.rewards.qwen_image_bench import AnswerError, extract_json, nest_answer
from rewardkit.rewards.qwen_image_bench_checklist import LEVEL1_DIMS, RESIZE_LONG_EDGE, parse_dims

__all__ = ["QwenImageBenchMetric", "QIB_REPO", "dimension_sets"]

QIB_REPO = "Qwen/Qwen-Image-Bench"  # DiffSynth's default model_id (ModelScope), also on Hugging Face
QIB_MODEL_PATTERN = "model-*.safetensors"  # DiffSynth's default origin_file_pattern: the repo root's shards
QIB_MAX_NEW_TOKENS = 4096  # DiffSynth from_pretrained default


def _weights(config: ModelConfig) -> str:
    """The folder holding ``config``'s files: a local path, or an ``ms:`` / ``hf:`` spec the backend fetches."""
    pattern = config.origin_file_pattern
    if config.path is None and pattern not in (None, "", "./") and not pattern.endswith("/"):
        folder = posixpath.dirname(pattern)  # "model-*.safetensors" -> the repo root
        config = ModelConfig(model_id=config.model_id, origin_file_pattern=f"{folder}/" if folder else None,
                             download_source=config.download_source, local_model_path=config.local_model_path,
                             skip_download=config.skip_download)
    spec = config.to_spec()
    return str(Path(spec).parent) if Path(spec).is_file() else spec


def dimension_sets(dimensions: Any, batch_size: int) -> list[tuple[str, ...]]:
    """DiffSynth's ``_normalize_dimensions``: one tuple of level-1 names per sample.

    A list/tuple holding any non-string is per sample (its length must be ``batch_size``); anything else is one
    set for every sample. An empty set means all five, as DiffSynth.
    """
    if isinstance(dimensions, (list, tuple)) and dimensions and not all(isinstance(d, str) for d in dimensions):
        if len(dimensions) != batch_size:
            raise ValueError(f"qwen-image-bench: expected {batch_size} dimension sets (one per sample), "
                             f"got {len(dimensions)}")
        return [_one_set(spec) for spec in dimensions]
    return [_one_set(dimensions)] * batch_size


def _one_set(spec: Any) -> tuple[str, ...]:
    if isinstance(spec, (list, tuple, dict)) and not spec:
        return LEVEL1_DIMS
    return parse_dims(spec)


def _none(value: Any) -> Any:
    """NaN -> None, recursively through dicts (DiffSynth's 'no score')."""
    if isinstance(value, dict):
        return {key: _none(item) for key, item in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def _mean(values: Any) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _raw_score(text: str | None, level1: str) -> dict | None:
    """DiffSynth's ``raw_scores`` entry: the repaired answer JSON, ``None`` when there is none."""
    try:
        return nest_answer(extract_json(text), level1)[0]
    except AnswerError:
        return None


class QwenImageBenchMetric(Metric):
    """Qwen-Image-Bench with DiffSynth's call shapes; images are PIL images or paths.

    ``evaluate(prompt, images, dimensions=None)`` -> one dict per image (module docstring);
    ``score`` / ``compute`` / ``forward(prompt, images, dimensions=None)`` -> ``[total_score or nan]``.
    """

    registry_name = "qwen-image-bench"

    @classmethod
    def from_pretrained(cls, model_config: ModelConfig | None = None,  # type: ignore[override]
                        processor_config: ModelConfig | None = None, torch_dtype: torch.dtype | None = None,
                        device: Any = DEFAULT_DEVICE, max_new_tokens: int | None = None,
                        resize_long_edge: int | None = None, processor_kwargs: dict | None = None,
                        vram_limit: float | None = None, **load_options: Any) -> QwenImageBenchMetric:
        """Build the metric; ``load_options`` go to ``rewardkit.load`` (e.g. ``batch_size``, ``device_map``).

        ``max_new_tokens`` / ``resize_long_edge``: ``None`` = a ``rewardkit.json`` value beside local weights
        (tiny test folders), else DiffSynth's defaults (``QIB_MAX_NEW_TOKENS``, ``RESIZE_LONG_EDGE``).

        Raises:
            ValueError: a ``processor_config`` naming another folder than the weights.
        """
        if vram_limit is not None:
            warnings.warn(f"{cls.registry_name}: vram_limit is ignored by rewardkit", stacklevel=2)
        model_config = model_config or ModelConfig(model_id=QIB_REPO, origin_file_pattern=QIB_MODEL_PATTERN)
        weights = _weights(model_config)
        if processor_config is not None and _weights(processor_config) != weights:
            raise ValueError(f"{cls.registry_name}: the processor is read from the weights folder {weights!r}; "
                             f"processor_config names {_weights(processor_config)!r}: copy the processor files "
                             "beside the weights or leave processor_config out")
        if processor_kwargs:
            load_options["processor_kwargs"] = dict(processor_kwargs)
        for key, value in (("max_new_tokens", max_new_tokens), ("resize_long_edge", resize_long_edge)):
            if value is not None:
                load_options[key] = value
        _with_sidecar(weights, load_options)
        load_options.setdefault("max_new_tokens", QIB_MAX_NEW_TOKENS)
        load_options.setdefault("resize_long_edge", RESIZE_LONG_EDGE)
        dtype = _rewardkit_dtype(model_config.computation_dtype or torch_dtype)
        device = model_config.computation_device or device
        return cls(load_for(cls.__name__, cls.registry_name, weights, device=device, dtype=dtype, **load_options))

    def evaluate(self, prompt: str | list[str] | None, images: Any,  # type: ignore[override]
                 dimensions: Any = None) -> list[dict[str, Any]]:
        pils, prompts = self._pairs("" if prompt is None else prompt, images)
        prompts = list(prompts or [""] * len(pils))
        dims = dimension_sets(dimensions, len(pils))
        results: list[dict[str, Any]] = [{} for _ in pils]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(pils):  # a tensor batch holds one image size
            groups.setdefault(image.size, []).append(index)
        for indices in groups.values():
            batch = torch.stack([pil_to_tensor(pils[i]) for i in indices])
            with torch.no_grad():
                out = self.reward.evaluate(batch, [prompts[i] for i in indices], dims=[dims[i] for i in indices])
            for row, i in enumerate(indices):
                results[i] = self._row(out, row, dims[i])
        return results

    @staticmethod
    def _row(out: Any, row: int, level1s: tuple[str, ...]) -> dict[str, Any]:
        # Level 1 and the total are re-averaged from the float64 level-2 scores, as DiffSynth's Python floats
        # (the reward's (B,) tensors are float32).
        details = out.details
        texts = dict(zip(level1s, details["raw"][row]))
        level1 = {d: _mean(details["level2"][row].get(d, {}).values()) for d in level1s}
        return {
            "total_score": _none(_mean(level1.values())),
            "level1_scores": _none(level1),
            "level2_scores": _none(details["level2"][row]),
            "level3_scores": _none(details["level3"][row]),
            "raw_scores": {d: _raw_score(texts[d], d) for d in level1s},
            "raw_outputs": texts,
            "parse_failures": list(details["parse_failures"][row]),
            "facet_failures": list(details["facet_failures"][row]),
            "failure": details["failure"][row],
        }

    def score(self, prompt: str | list[str] | None, images: Any,  # type: ignore[override]
              dimensions: Any = None) -> list[float]:
        return [math.nan if row["total_score"] is None else row["total_score"]
                for row in self.evaluate(prompt, images, dimensions=dimensions)]

    compute = forward = score
