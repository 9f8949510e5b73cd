"""HPSv3 architecture: Qwen2-VL (transformers ``Qwen2VLModel``) plus the ``rm_head`` regression MLP.

Upstream: ``MizzenAI/HPSv3`` ``hpsv3/model/qwen2vl_trainer.py`` (``Qwen2VLRewardModelBT``, ``rm_head_type="ranknet"``,
``rm_head_kwargs=None``) and DiffSynth-Studio ``diffsynth/models/hpsv3.py`` (``HPSv3Qwen2VLRewardModel``, the same
head; ``default_config`` is the Qwen2-VL-7B-Instruct configuration with the vocabulary grown by ``<|Reward|>``).

The reward is read at the one ``<|Reward|>`` token of each row: the final decoder state (after the last RMSNorm)
goes through ``Linear(H, 1024) -> ReLU -> Dropout(0.05) -> Linear(1024, 16) -> ReLU -> Linear(16, 2)`` in float32,
giving ``[mu, log_sigma]``. ``lm_head`` is never used and is not part of this module.

Positions (reference/vlm_family.md 3.5): upstream ran on transformers 4.45.2, whose text model received
``inputs_embeds`` only and filled in ``arange(L)`` on all three M-RoPE axes ("sequential"); DiffSynth on
transformers 5.x passes ``input_ids`` + ``image_grid_thw`` + ``mm_token_type_ids`` and gets 3-D M-RoPE
positions ("mrope"). :class:`HPSv3Net` runs either.

This module also holds the tensor form of the Qwen2-VL image processor's patch layout
(:func:`patchify`), so that ``pixel_values`` can be built from a tensor with autograd, and the strict checkpoint
key map / loader (:func:`hpsv3_key_map`, :func:`build_hpsv3_net`: a state dict in, no file I/O).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HPSv3Head", "HPSv3Net", "hpsv3_qwen2vl_config", "sequential_position_ids", "patchify", "PositionMode",
           "hpsv3_key_map", "build_hpsv3_net", "round_rotary_frequencies", "HPSV3_VOCAB_SIZE", "HEAD_HIDDEN",
           "HEAD_BOTTLENECK", "HEAD_OUTPUTS", "HEAD_DROPOUT", "UNUSED_KEYS"]

PositionMode = Literal["sequential", "mrope"]
POSITION_MODES = ("sequential", "mrope")
HPSV3_VOCAB_SIZE = 151658  # DiffSynth model_configs.py extra_kwargs vocab_size: Qwen2-VL tokenizer + <|Reward|>
HEAD_HIDDEN = 1024  # qwen2vl_trainer.py ranknet head: nn.Linear(config.hidden_size, 1024)
HEAD_BOTTLENECK = 16  # qwen2vl_trainer.py ranknet head: nn.Linear(1024, 16)
HEAD_OUTPUTS = 2  # config/HPSv3_7B.yaml output_dim: [mu, log_sigma]
HEAD_DROPOUT = 0.05  # qwen2vl_trainer.py ranknet head: nn.Dropout(0.05) (identity at inference)
MROPE_AXES = 3  # temporal, height, width
UNUSED_KEYS = ("lm_head.weight",)  # Qwen2VLForConditionalGeneration's LM head: in both checkpoints, never used
# Checkpoint prefix -> HPSv3Net prefix, first match wins: transformers-5.x keys (DiffSynth's converter output) are
# kept, transformers-4.45 keys (upstream HPSv3.safetensors) are renamed as DiffSynth's
# ImageMetricsHPSv3StateDictConverter and transformers' Qwen2VL conversion mapping do.
_KEY_PREFIXES = (("model.language_model.", "model.language_model."), ("model.visual.", "model.visual."),
                 ("visual.", "model.visual."), ("model.", "model.language_model."), ("rm_head.", "rm_head."))


def hpsv3_key_map(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream (transformers 4.45) or transformers-5.x HPSv3 keys -> :class:`HPSv3Net` keys; ``lm_head`` dropped.

    Raises:
        ValueError: no ``rm_head.*`` keys (e.g. a plain Qwen2-VL checkpoint), or two keys mapping to one name.
    """
    from rewardkit.weights import drop_keys, rename_prefixes

    if not any(key.startswith("rm_head.") for key in state):
        sample = ", ".join(list(state)[:5])
        raise ValueError(f"hpsv3: not an HPSv3 checkpoint (no 'rm_head.*' keys; found {sample} ...); pass "
                         "HPSv3.safetensors (MizzenAI/HPSv3) or DiffSynth's HPSv3/model.safetensors")
    return rename_prefixes(drop_keys(state, UNUSED_KEYS), _KEY_PREFIXES)  # other keys stay: reported as unexpected


def build_hpsv3_net(state: dict[str, torch.Tensor], config: Any, dtype: torch.dtype | None = None,
                    rope_dtype: torch.dtype | None = torch.bfloat16) -> HPSv3Net:
    """Build :class:`HPSv3Net` on the meta device and assign ``state`` (after :func:`hpsv3_key_map`) strictly.

    The trunk takes ``dtype`` (``None``: float32), the head float32. The rotary ``inv_freq`` buffers (not in
    checkpoints) are computed afresh in float32 on the CPU, then rounded to ``rope_dtype`` values (see
    :func:`round_rotary_frequencies`; ``None`` keeps them exact).

    Raises:
        rewardkit.weights.CheckpointMismatchError: missing / unexpected keys or shape conflicts, all listed.
    """
    from rewardkit.weights import CheckpointMismatchError

    mapped = hpsv3_key_map(state)
    with torch.device("meta"):  # no random init of 8B parameters that the checkpoint overwrites
        net = HPSv3Net(config)
    expected = net.state_dict()
    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in mapped if k not in expected]
    conflicts = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}" for k, v in mapped.items()
                 if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or conflicts:
        shown = [f"{len(x)} {what} {x[:10]}" for x, what in ((missing, "missing keys"), (unexpected, "unexpected keys"),
                                                                (conflicts, "shape conflicts"))]
        raise CheckpointMismatchError("hpsv3: checkpoint does not match the model: " + ", ".join(shown) + "; a "
                                      "checkpoint file carries no architecture: pass config=... (a Qwen2VLConfig) for "
                                      "other sizes", missing, unexpected, conflicts)
    net.load_state_dict(mapped, strict=True, assign=True)
    net.model.to(dtype or torch.float32)
    net.rm_head.float()
    _rebuild_rotary_buffers(net)
    if rope_dtype is not None:
        round_rotary_frequencies(net, rope_dtype)
    return net.eval().requires_grad_(False)


def round_rotary_frequencies(net: nn.Module, dtype: torch.dtype) -> None:
    """Round every rotary ``inv_freq`` / ``original_inv_freq`` buffer to ``dtype`` values, kept in float32.

    Upstream HPSv3 (``create_model_and_processor``: ``model.to(torch.bfloat16)`` on transformers 4.45.2) and
    DiffSynth (``model.to(dtype=torch_dtype)``) cast these buffers with the weights, so the released model was
    trained and is run with bf16-rounded rotary frequencies (up to ~1 rad of phase at position 900). 4.45.2's
    vision rotary also multiplied positions by them in bf16, which is not reproduced (positions there are < 64).
    """
    with torch.no_grad():
        for name, buffer in net.named_buffers():
            if name.endswith("inv_freq"):
                buffer.copy_(buffer.to(dtype).float())


def _rebuild_rotary_buffers(net: nn.Module) -> None:
    """Replace every module whose (non-persistent) buffers are still on the meta device by a fresh CPU copy."""
    for name, module in list(net.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if any(p.is_meta for p in module.parameters(recurse=False)) or not hasattr(module, "config"):
            raise RuntimeError(f"hpsv3: cannot rebuild the meta buffers of {name} ({type(module).__name__})")
        parent_name, _, child = name.rpartition(".")
        with torch.device("cpu"):
            setattr(net.get_submodule(parent_name), child, type(module)(module.config))


def hpsv3_qwen2vl_config(vocab_size: int = HPSV3_VOCAB_SIZE) -> Any:
    """The Qwen2-VL-7B-Instruct ``Qwen2VLConfig`` of HPSv3 (DiffSynth ``HPSv3Qwen2VLRewardModel.default_config``)."""
    from transformers import Qwen2VLConfig

    text = {"vocab_size": vocab_size, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 28,
            "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
            "rope_parameters": {"rope_type": "default", "type": "mrope", "mrope_section": [16, 24, 24],
                                "rope_theta": 1000000.0}}
    vision = {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4, "num_heads": 16, "in_channels": 3,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                         vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False)


class HPSv3Head(nn.Sequential):
    """The ranknet head; state-dict keys ``0.*``, ``3.*``, ``5.*`` as upstream's ``nn.Sequential``.

    ``forward``: hidden states ``(..., H)`` of any dtype -> ``(..., 2)`` float32, computed in float32 with autocast
    off (upstream keeps ``rm_head`` in float32 and runs it under a float32 autocast).
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__(nn.Linear(hidden_size, HEAD_HIDDEN), nn.ReLU(), nn.Dropout(HEAD_DROPOUT),
                         nn.Linear(HEAD_HIDDEN, HEAD_BOTTLENECK), nn.ReLU(), nn.Linear(HEAD_BOTTLENECK, HEAD_OUTPUTS))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = hidden.float()
        with torch.autocast(x.device.type, enabled=False):
            for layer in self:
                if isinstance(layer, nn.Linear):
                    x = F.linear(x, layer.weight.float(), layer.bias.float())
                elif isinstance(layer, nn.ReLU):
                    x = torch.relu(x)
        return x  # Dropout is skipped: rewards are always in eval mode


def sequential_position_ids(batch: int, length: int, device: torch.device | str) -> torch.Tensor:
    """Upstream HPSv3's positions: ``arange(length)`` on all three M-RoPE axes, int64 ``(3, batch, length)``.

    transformers 4.45.2 ``Qwen2VLModel.forward`` with ``position_ids=None`` (``cache_position.view(1, 1, -1)
    .expand(3, B, -1)``); with right padding every row's real tokens sit at positions ``0..n-1``.
    """
    return torch.arange(length, device=device).view(1, 1, length).expand(MROPE_AXES, batch, length)


def patchify(pixels: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """Normalised images ``(B, C, H, W)`` -> Qwen2-VL ``pixel_values`` ``(B * gh * gw, C * T * p * p)``.

    The layout of ``Qwen2VLImageProcessor``: a still image is repeated ``T = temporal_patch_size`` times along
    time; rows run over merge windows (``gh / m``, ``gw / m``), then the ``m x m`` patches inside a window; each
    row is flattened as (channel, time, patch row, patch column). ``H`` and ``W`` must be multiples of
    ``patch_size * merge_size``. Differentiable.
    """
    batch, channels, height, width = pixels.shape
    factor = patch_size * merge_size
    if height % factor or width % factor:
        raise ValueError(f"hpsv3: image size {height}x{width} is not a multiple of {factor} (patch_size x merge_size)"
                         "; resize with smart_resize first")
    gh, gw = height // patch_size, width // patch_size
    x = pixels.reshape(batch, channels, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size,
                       patch_size)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # B, gh/m, gw/m, m, m, C, p, p
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal_patch_size, patch_size, patch_size)
    return x.reshape(batch * gh * gw, channels * temporal_patch_size * patch_size * patch_size)


class HPSv3Net(nn.Module):
    """``model`` (a transformers ``Qwen2VLModel``: keys ``model.visual.*``, ``model.language_model.*``) + ``rm_head``.

    Args:
        config: a ``transformers.Qwen2VLConfig`` (default :func:`hpsv3_qwen2vl_config`).
    """

    def __init__(self, config: Any = None) -> None:
        super().__init__()
        from transformers import Qwen2VLModel

        self.config = config if config is not None else hpsv3_qwen2vl_config()
        self.model = Qwen2VLModel(self.config)
        self.rm_head = HPSv3Head(self.config.text_config.hidden_size)

    def forward(self, inputs: dict[str, torch.Tensor], reward_token_id: int,
                position_mode: PositionMode = "sequential") -> torch.Tensor:
        """One forward of the trunk, then the head at the reward token.

        Args:
            inputs: ``input_ids`` / ``attention_mask`` ``(B, L)`` (right padded), ``pixel_values``
                ``(N, C*T*p*p)``, ``image_grid_thw`` ``(B, 3)``, and for ``"mrope"`` ``mm_token_type_ids`` ``(B, L)``.
            reward_token_id: id of ``<|Reward|>``; each row must hold it exactly once.
            position_mode: ``"sequential"`` (upstream HPSv3) or ``"mrope"`` (DiffSynth on transformers 5.x).

        Returns:
            float32 ``(B, 2)``: ``[mu, log_sigma]`` per row.
        """
        input_ids = inputs["input_ids"]
        is_reward = input_ids == reward_token_id
        counts = is_reward.sum(dim=1)
        if bool((counts != 1).any()):
            raise ValueError(f"hpsv3: every row must hold exactly one <|Reward|> token (id {reward_token_id}), got "
                             f"counts {counts.tolist()}; the prompt must not contain '<|Reward|>'")
        batch, length = input_ids.shape
        kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
        if position_mode == "sequential":
            kwargs["position_ids"] = sequential_position_ids(batch, length, input_ids.device)
        elif position_mode == "mrope":
            kwargs["mm_token_type_ids"] = inputs["mm_token_type_ids"]
        else:
            raise ValueError(f"hpsv3: position_mode must be one of {POSITION_MODES}, got {position_mode!r}")
        hidden = self.model(**kwargs, use_cache=False).last_hidden_state  # (B, L, H)
        rows = torch.arange(batch, device=input_ids.device)
        return self.rm_head(hidden[rows, is_reward.float().argmax(dim=1)])
