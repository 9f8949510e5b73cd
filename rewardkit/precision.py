"""Precision policy: autocast on any device type, float32 outputs.

rewardkit has two speed modes:

* **exact** (``dtype=None`` or ``"fp32"``, the default): everything in float32.
* **fast** (``dtype="bf16"`` or ``"fp16"``): the towers run under ``torch.autocast`` on the images'
  device type (CUDA, CPU, MPS, XPU, ...), and the final heads, norms and score arithmetic run in float32.
  Models that opt in (the CLIP family) hold their matmul weights (``Linear``, ``Conv``, attention
  projections) in the low dtype once, via :func:`cast_matmul_weights`: autocast otherwise re-casts every
  frozen float32 weight at every call (a CPU profile showed 60 % of the time in ``aten::copy_``).
  LayerNorm, embeddings, ``logit_scale`` and the reward heads stay float32. Outputs are always float32.
  Their ``nn.MultiheadAttention`` self-attention (open_clip towers) runs through one packed ``F.linear`` and
  ``F.scaled_dot_product_attention`` (:class:`SdpaSelfAttention`): torch's general path projects a seq-first
  *transposed* view, which ``F.linear`` turns into a ``bmm`` against the weight expanded once per token position;
  in bf16 that expansion is materialised (a CPU profile of open_clip's masked text tower: 62 % of its time in
  ``aten::copy_`` of ``(77, 512, 1536)`` tensors, the tower 2.1x slower than fp32).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
import torch.nn.functional as F

from rewardkit.fp32_precision import ieee_float32

__all__ = ["parse_dtype", "autocast_for", "dtype_name", "cpu_supports", "cast_matmul_weights",
           "SdpaSelfAttention", "route_attention_through_sdpa"]

_ALIASES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "float32": None,
    "float": None,
    "exact": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map a user-facing dtype to the autocast dtype; ``None`` means float32 (no autocast).

    Raises:
        ValueError: an unknown dtype name.
    """
    if dtype is None or dtype == torch.float32:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
        raise ValueError(f"unsupported dtype {dtype}; use None/'fp32', 'bf16' or 'fp16'")
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _ALIASES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_ALIASES)}")
    return _ALIASES[key]


def dtype_name(dtype: torch.dtype | None) -> str:
    """``None`` -> ``"fp32"``, ``torch.bfloat16`` -> ``"bf16"``, ``torch.float16`` -> ``"fp16"``."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


_WARNED: set[torch.dtype] = set()


def cpu_supports(dtype: torch.dtype) -> bool:
    """Whether this CPU has native ``dtype`` matrix instructions (AVX512-BF16 / AMX / AVX512-FP16).

    Without them, oneDNN emulates bf16/fp16 and autocast is several times *slower* than float32
    (measured: about 7x on an AVX2-only EPYC, benchmarks/results/clip_rewards.md).
    """
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    check = getattr(torch.ops.mkldnn, probe, None)
    return bool(check()) if check is not None else True  # unknown: do not warn


@contextlib.contextmanager
def autocast_for(device: torch.device | str, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` for ``device``'s type with ``dtype``; with ``dtype=None``, autocast OFF.

    ``None`` is the exact fp32 mode (IEEE float32 kernels, whatever TF32 / matmul-precision settings the
    process has: :func:`rewardkit.fp32_precision.ieee_float32`), and it stays exact when the caller runs inside its own autocast
    region (``accelerator.autocast()``, a bf16 training step): otherwise the reward would silently run in
    bf16 and, worse, cache bf16 text embeddings that later exact calls reuse. Never hard-codes CUDA:
    the device type is taken from the tensors being processed.
    """
    device_type = torch.device(device).type
    if dtype is None:
        # Exact also means IEEE float32 kernels: TF32 convolutions (PyTorch's CUDA default) or bf16 matmuls set
        # by the caller's set_float32_matmul_precision would move the scores (see rewardkit.fp32_precision).
        with ieee_float32():
            if not torch.is_autocast_enabled(device_type):
                yield
                return
            with torch.autocast(device_type=device_type, enabled=False):
                yield
        return
    if device_type == "cpu" and dtype not in _WARNED and not cpu_supports(dtype):
        _WARNED.add(dtype)
        warnings.warn(
            f"{dtype_name(dtype)} autocast on this CPU has no native {dtype_name(dtype)} instructions and runs "
            "slower than float32; use dtype=None (exact fp32) here, and the fast mode on a GPU or a CPU with "
            "AVX512-BF16/AMX",
            RuntimeWarning,
            stacklevel=3,
        )
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield


def cast_matmul_weights(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast, in place, the weights that autocast would re-cast at every call: ``Linear``/``Conv`` weight and
    bias, and ``MultiheadAttention``'s packed ``in_proj_*`` (its ``out_proj`` is a ``Linear``).

    Everything else (LayerNorm, embeddings, ``logit_scale``, buffers) keeps its dtype, so normalisation and
    the score arithmetic stay float32. Use on a module of its own (never on towers an exact-mode model shares).

    Returns:
        ``module`` (for chaining).
    """
    matmul_types = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    for sub in module.modules():
        if isinstance(sub, matmul_types):
            names = ("weight", "bias")
        elif isinstance(sub, torch.nn.MultiheadAttention):
            names = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        else:
            continue
        for name in names:
            param = getattr(sub, name, None)
            if isinstance(param, torch.nn.Parameter) and param.is_floating_point():
                param.data = param.data.to(dtype)
    return module


class SdpaSelfAttention(torch.nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose batch-first self-attention (``query is key is value``, a float or no
    ``attn_mask``, no weights returned, eval mode) runs as ``F.linear`` on the contiguous ``(B, L, D)`` input, then
    ``F.scaled_dot_product_attention`` and ``out_proj``: the same operations as torch's path (scale
    ``1/sqrt(head_dim)``, additive mask), without its transposed-view projection. Any other call falls back to
    ``nn.MultiheadAttention.forward`` unchanged. Installed on a module by :func:`route_attention_through_sdpa`.
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
                need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        float_mask = attn_mask is None or (attn_mask.is_floating_point() and attn_mask.dim() == 2)
        if not (query is key is value and self.batch_first and not need_weights and key_padding_mask is None
                and not is_causal and float_mask and query.dim() == 3 and not self.training
                and self._qkv_same_embed_dim and self.bias_k is None and not self.add_zero_attn):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        batch, length, width = query.shape
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3D)
        q, k, v = qkv.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if attn_mask is None else attn_mask.to(q.dtype)  # SDPA needs the query's dtype (or bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, L, head_dim)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return self.out_proj(out), None


def route_attention_through_sdpa(module: torch.nn.Module) -> torch.nn.Module:
    """Make every plain ``nn.MultiheadAttention`` in ``module`` an :class:`SdpaSelfAttention`, in place (same
    parameters, same results up to rounding; only the fast-mode copies of towers use it). Returns ``module``."""
    for sub in module.modules():
        if type(sub) is torch.nn.MultiheadAttention:
            sub.__class__ = SdpaSelfAttention
    return module
