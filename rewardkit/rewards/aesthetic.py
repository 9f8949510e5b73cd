"""LAION improved aesthetic predictor ("sac+logos+ava1-l14-linearMSE").

Upstream: ``christophschuhmann/improved-aesthetic-predictor`` ``simple_inference.py``: OpenAI CLIP
ViT-L/14 (``clip.load``; QuickGELU) image embedding -> L2 normalisation -> the linear MLP
(``rewardkit.nets.aesthetic_mlp``). Preprocessing is OpenAI ``clip.load``'s: shortest side -> 224
PIL bicubic, torchvision (round) center crop, OpenAI mean/std. Upstream ran CLIP in fp16 on CUDA;
rewardkit's exact mode is fp32 (DiffSynth-Studio's too).

Weights, either:

* ``weights=`` the MLP head ``.pth`` (default: the Hugging Face mirror
  ``camenduru/improved-aesthetic-predictor``, a third-party copy of the GitHub file) plus
  ``clip_weights=`` the image tower (default ``hf:openai/clip-vit-large-patch14``). When clip-score is
  loaded from the same tower weights, both rewards share one image tower in memory (so moving one
  reward with ``.to(...)`` moves the shared tower of the other too).
* ``weights=`` a DiffSynth-Studio ``Aesthetic/model.safetensors`` (tower + projection + head merged).

Scores from DiffSynth-Studio's ``AestheticMetric`` differ on inputs whose resized long side leaves a
crop offset ending in .5 (floor vs round crop, reference/clip_family.md E12), e.g. 832x1216.
"""

from __future__ import annotations

from typing import Any

import torch

from rewardkit.nets.aesthetic_mlp import AestheticMLP
from rewardkit.nets.clip import OPENAI_VIT_L_14
from rewardkit.rewards.clip_common import (
    ClipCheckpoint,
    ClipEmbeddingReward,
    load_clip_checkpoint,
    load_hf_towers_from_state,
    resolve_device,
    spec_for,
)
from rewardkit.weights import load_state_dict_strict, read_state_dict, resolve_weights, strip_prefixes

__all__ = ["AestheticReward", "load", "DEFAULT_HEAD", "DEFAULT_CLIP"]

DEFAULT_HEAD = "hf:camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"
DEFAULT_CLIP = "hf:openai/clip-vit-large-patch14"
# DiffSynth-Studio ImageMetricsAestheticStateDictConverter strips these wrappers, in this order.
WRAPPER_PREFIXES = ("model.", "module.", "aesthetic_model.", "aesthetics_predictor.", "predictor.")


class AestheticReward(ClipEmbeddingReward):
    """``MLP(normalize(clip_image_embedding))``, float32 ``(B,)``; prompts are ignored."""

    name = "aesthetic"
    higher_is_better = True
    differentiable = True
    requires_prompt = False

    def __init__(self, towers: Any, spec: Any, mlp: AestheticMLP, dtype: Any = None) -> None:
        super().__init__(towers, spec, dtype=dtype)
        self.mlp = mlp.eval().requires_grad_(False)

    def head(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        # The head runs in float32 even in fast mode (autocast is not active here).
        return self.mlp(image_embeds), {}


def _head_from_state(state: dict[str, torch.Tensor]) -> AestheticMLP:
    if "layers.0.weight" not in state:
        raise ValueError("aesthetic: the head checkpoint has no 'layers.0.weight'; expected the LAION MLP .pth")
    mlp = AestheticMLP(input_size=state["layers.0.weight"].shape[1])
    load_state_dict_strict(mlp, state, name="aesthetic head")
    return mlp


def load(
    weights: Any = None,
    device: Any = None,
    dtype: Any = None,
    *,
    clip_weights: Any = None,
    config: Any = None,
) -> AestheticReward:
    """Load the LAION aesthetic predictor.

    Args:
        weights: the MLP head ``.pth`` or a DiffSynth merged safetensors (see module docstring).
        device: where the model lives (default CPU).
        dtype: ``None`` (exact fp32) or ``"bf16"`` / ``"fp16"`` autocast for the image tower.
        clip_weights: the ViT-L/14 image tower for a head-only ``weights``.
        config: HF ``CLIPConfig`` kwargs for a tower of another size (tests, custom heads).
    """
    path = resolve_weights(weights or DEFAULT_HEAD, what="aesthetic")
    state = strip_prefixes(read_state_dict(path), WRAPPER_PREFIXES)
    head_state = {k: v for k, v in state.items() if k.startswith("layers.")}
    tower_state = {k: v for k, v in state.items() if not k.startswith("layers.")}
    mlp = _head_from_state(head_state)
    if tower_state:  # merged DiffSynth file: the tower travels with the head
        if clip_weights is not None:
            raise ValueError("aesthetic: weights already contain an image tower; do not pass clip_weights")
        towers = load_hf_towers_from_state(tower_state, config or OPENAI_VIT_L_14, name="aesthetic")
        checkpoint = ClipCheckpoint(towers, "hf", path, {})
    else:
        checkpoint = load_clip_checkpoint(
            clip_weights or DEFAULT_CLIP,
            name="aesthetic",
            default_config={"hf": OPENAI_VIT_L_14, "open_clip": "ViT-L-14"},
            config=config,
            vision_only=True,
        )
    # OpenAI clip.load preprocessing (torchvision on PIL, round crop), whatever format the tower is in.
    spec = spec_for(checkpoint, crop_rounding="round", pil_backend="torchvision")
    return AestheticReward(checkpoint.towers, spec, mlp, dtype=dtype).to(resolve_device(device))
