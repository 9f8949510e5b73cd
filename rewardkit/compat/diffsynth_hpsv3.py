"""DiffSynth-Studio's ``HPSv3Metric`` (``diffsynth/metrics/hpsv3.py``, fed7b18f) on rewardkit.

    from rewardkit.compat.diffsynth_hpsv3 import HPSv3Metric   # was: from diffsynth.metrics import HPSv3Metric
    HPSv3Metric.from_pretrained(device="cuda").compute("a cat", [image, "b.png"])  # -> [float, float]

Same ``from_pretrained`` arguments and defaults (``HPSv3/model.safetensors`` and the processor folder ``HPSv3/`` of
``DiffSynth-Studio/ImageMetrics``, ``torch_dtype=torch.bfloat16``, ``score_index=0``, 256x28x28 pixels), the same
pairing (1 prompt x N images, N prompts x 1 image, else equal counts; reference/vlm_family.md section 2) and list
results. Scores are rewardkit's exact path (PIL bicubic smart resize + the real processor), one forward per chunk of
``batch_size`` rows. Differences: positions follow upstream HPSv3 (``position_mode="sequential"``; DiffSynth on
transformers 5.x gets 3-D M-RoPE positions, pass ``position_mode="mrope"`` to reproduce it);
``use_special_tokens=False`` raises (it is broken in both DiffSynth and upstream, section 3.4); ``vram_limit`` is
ignored; ``evaluate()`` (which DiffSynth's HPSv3 lacks) returns ``mu``, ``sigma`` and ``log_sigma``; arguments after
``device`` are keyword-only.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from rewardkit.compat.diffsynth import (
    _TOKENIZER_PATTERNS,
    DEFAULT_DEVICE,
    IMAGE_METRICS_REPO,
    Metric,
    ModelConfig,
    _default,
    _model_weights,
    _rewardkit_dtype,
    load_for,
)

__all__ = ["HPSv3Metric", "HPSV3_DIFFSYNTH_PIXELS"]

HPSV3_DIFFSYNTH_PIXELS = 256 * 28 * 28  # diffsynth/metrics/hpsv3.py from_pretrained max_pixels / min_pixels
SCORE_COLUMNS = ("mu", "log_sigma")  # HPSv3Model.forward: rewards[:, score_index]


class HPSv3Metric(Metric):
    """HPSv3: ``mu`` (``score_index=0``) or ``log_sigma`` (``score_index=1``) per (prompt, image) pair.

    ``score`` / ``compute`` / ``forward(prompt, images)`` -> ``list[float]``; ``evaluate(prompt, images)`` ->
    ``[{"score": mu, "mu": float, "log_sigma": float, "sigma": float}, ...]``. Images are PIL images or paths.
    """

    registry_name = "hpsv3"
    model_pattern = "HPSv3/model.safetensors"
    processor_pattern = "HPSv3/"

    def __init__(self, reward: Any, score_index: int = 0) -> None:
        super().__init__(reward)
        if score_index not in (0, 1):
            raise ValueError(f"hpsv3: score_index must be 0 (mu) or 1 (log_sigma), got {score_index!r}")
        self.score_index = score_index

    @classmethod
    def from_pretrained(cls, model_config: ModelConfig | None = None,  # type: ignore[override]
                        processor_config: ModelConfig | None = None, torch_dtype: torch.dtype | None = torch.bfloat16,
                        device: Any = DEFAULT_DEVICE, *, score_index: int = 0, use_special_tokens: bool = True,
                        max_pixels: int = HPSV3_DIFFSYNTH_PIXELS, min_pixels: int = HPSV3_DIFFSYNTH_PIXELS,
                        processor_kwargs: dict | None = None, vram_limit: float | None = None,
                        **load_options: Any) -> HPSv3Metric:
        """Build the metric.

        Args:
            model_config: the weights (default ``HPSv3/model.safetensors`` of DiffSynth-Studio/ImageMetrics; upstream
                ``HPSv3.safetensors`` loads too).
            processor_config: a Qwen2-VL processor folder (default ``HPSv3/`` of the same repo when the weights come
                from it; otherwise the folder beside the weights, else Qwen/Qwen2-VL-7B-Instruct).
            torch_dtype: ``torch.bfloat16`` (default: bf16 trunk, float32 head) or ``None`` / ``torch.float32``.
            device: where the model lives.
            score_index: 0 returns ``mu`` (the HPSv3 score), 1 ``log_sigma``.
            use_special_tokens: must be True (the only working mode).
            max_pixels, min_pixels: the smart-resize limits.
            processor_kwargs: passed to ``AutoProcessor.from_pretrained``.
            vram_limit: ignored (warns).
            **load_options: more ``rewardkit.load`` options (``position_mode=``, ``batch_size=``, ``config=``).
        """
        if not use_special_tokens:
            raise ValueError("hpsv3: use_special_tokens=False is not supported: the released model reads its score at "
                             "<|Reward|>, and that mode is broken in DiffSynth and upstream alike")
        if vram_limit is not None:
            warnings.warn("hpsv3: vram_limit is ignored by rewardkit (the model is loaded whole)", stacklevel=2)
        model_config = model_config or _default(cls.model_pattern, ModelConfig())
        if processor_config is None and model_config.model_id == IMAGE_METRICS_REPO:
            processor_config = _default(cls.processor_pattern, model_config)  # that repo's weights come alone
        weights = _model_weights(model_config)
        if processor_config is not None:
            folder = processor_config.resolve(_TOKENIZER_PATTERNS + ("*.jinja",))
            load_options.setdefault("processor", str(folder.parent if folder.is_file() else folder))
        if processor_kwargs:
            load_options.setdefault("processor_kwargs", dict(processor_kwargs))
        dtype = _rewardkit_dtype(model_config.computation_dtype or torch_dtype)
        device = model_config.computation_device or device
        reward = load_for(cls.__name__, cls.registry_name, weights, device=device, dtype=dtype, min_pixels=min_pixels,
                       max_pixels=max_pixels, **load_options)
        return cls(reward, score_index)

    def score(self, prompt: str | list[str], images: Any) -> list[float]:  # type: ignore[override]
        """One float per (prompt, image) pair: ``mu`` or ``log_sigma`` by ``score_index``."""
        out = self._output(prompt, images)
        return self.tensor_to_list(out.details[SCORE_COLUMNS[self.score_index]])

    compute = forward = score
