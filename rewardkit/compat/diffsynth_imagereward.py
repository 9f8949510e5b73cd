"""DiffSynth-Studio's ``ImageRewardMetric`` (``diffsynth/metrics/image_reward.py``, fed7b18f) on rewardkit.

    from rewardkit.compat.diffsynth_imagereward import ImageRewardMetric   # was: from diffsynth.metrics import ...
    ImageRewardMetric.from_pretrained(device="cuda").compute("a cat", [image, "b.png"])  # -> [float, float]

Same ``from_pretrained`` arguments and defaults (``ImageReward/model.safetensors`` and the tokenizer folder
``ImageReward/`` of ``DiffSynth-Studio/ImageMetrics``), the same pairing (1 prompt x N images, N prompts x 1
image, else equal counts) and list results. Scores are rewardkit's exact path, which equals upstream
``ImageReward.score``, as DiffSynth's do (reference/clip_family.md E6). Differences: ``torch_dtype=torch.bfloat16``
/ ``torch.float16`` work (bf16/fp16 autocast of the towers, MLP in float32; DiffSynth's crashes with a dtype
mismatch), ``vram_limit`` is ignored, ``evaluate()`` also returns the raw MLP output, arguments after ``device``
are keyword-only, and weights from elsewhere without a ``tokenizer_config`` use the tokenizer beside them,
else bert-base-uncased (upstream's).
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

__all__ = ["ImageRewardMetric", "IMAGEREWARD_MAX_LENGTH"]

IMAGEREWARD_MAX_LENGTH = 35  # diffsynth/metrics/image_reward.py from_pretrained(max_length=35), upstream's too


class ImageRewardMetric(Metric):
    """ImageReward: ``(MLP(BLIP [CLS] feature) - mean) / std`` per (prompt, image) pair.

    ``score`` / ``compute`` / ``forward(prompt, images)`` -> ``list[float]``; ``evaluate(prompt, images)`` ->
    ``[{"score": float, "raw": float}, ...]``. Images are PIL images or paths.
    """

    registry_name = "imagereward"
    model_pattern = "ImageReward/model.safetensors"
    processor_pattern = "ImageReward/"

    @classmethod
    def from_pretrained(cls, model_config: ModelConfig | None = None,  # type: ignore[override]
                        tokenizer_config: ModelConfig | None = None, torch_dtype: torch.dtype | None = None,
                        device: Any = DEFAULT_DEVICE, *, max_length: int = IMAGEREWARD_MAX_LENGTH,
                        tokenizer_kwargs: dict | None = None, vram_limit: float | None = None,
                        **load_options: Any) -> ImageRewardMetric:
        """Build the metric.

        Args:
            model_config: the weights (default ``ImageReward/model.safetensors`` of DiffSynth-Studio/ImageMetrics;
                upstream ``ImageReward.pt`` loads too).
            tokenizer_config: a BERT tokenizer folder (default ``ImageReward/`` of the same repo when the weights
                come from it; otherwise the folder beside the weights, else bert-base-uncased).
            torch_dtype: ``None`` / ``torch.float32`` exact; ``torch.bfloat16`` / ``torch.float16`` autocast.
            device: where the model lives.
            max_length: prompt tokens (default 35).
            tokenizer_kwargs: passed to ``BertTokenizer.from_pretrained``.
            vram_limit: ignored (warns).
            **load_options: more ``rewardkit.load`` options (e.g. ``config=`` for another architecture).
        """
        if vram_limit is not None:
            warnings.warn("imagereward: vram_limit is ignored by rewardkit (the model is loaded whole)", stacklevel=2)
        model_config = model_config or _default(cls.model_pattern, ModelConfig())
        if tokenizer_config is None and model_config.model_id == IMAGE_METRICS_REPO:
            tokenizer_config = _default(cls.processor_pattern, model_config)  # that repo's weights come alone
        weights = _model_weights(model_config)
        if tokenizer_config is not None:
            folder = tokenizer_config.resolve(_TOKENIZER_PATTERNS)
            load_options.setdefault("tokenizer", str(folder.parent if folder.is_file() else folder))
        if tokenizer_kwargs:
            load_options.setdefault("tokenizer_kwargs", dict(tokenizer_kwargs))
        dtype = _rewardkit_dtype(model_config.computation_dtype or torch_dtype)
        device = model_config.computation_device or device
        return cls(load_for(cls.__name__, cls.registry_name, weights, device=device, dtype=dtype, max_length=max_length,
                         **load_options))
