"""Reward-backprop losses (DRaFT, AlignProp, ReFL): ``loss = -scale * reduce(reward(images, prompts))``.

How the reward-backprop methods call a reward (reference/rl_integration.md §2.5-2.7):

* AlignProp (``mihirp1998/AlignProp``, ``aesthetic_loss_fn`` / ``hps_loss_fn``): the reward model is
  frozen with ``requires_grad_(False)`` but *not* run under ``no_grad``; pixels in ``[0, 1]`` go through a
  differentiable resize + normalise; loss ``-reward`` (or ``1 - score``), mixed precision fp16.
* DRaFT (Clark et al., ICLR'24; NeMo-Aligner DRaFT+ ``conf/draftp_sd.yaml``, UniRL PR #120): loss
  ``-reward.mean()``, reward model kept in fp32 (``precision: 32``).
* ReFL (``THUDM/ImageReward`` ``ReFL.py``): loss ``relu(2 - r).mean() * grad_scale``: take
  ``reward_loss(..., reduction="none")`` (= ``-r`` per row) and apply ``F.relu(loss + 2).mean()``.

Rewards that are lower-is-better (``higher_is_better=False``, e.g. LPIPS) get ``+scale * score``: the
returned value is always a loss to minimise.

Memory: ``checkpoint=True`` recomputes the image tower's transformer blocks in the backward pass
instead of storing their activations (``torch.utils.checkpoint``, non-reentrant). transformers' own
``gradient_checkpointing_enable()`` only acts in train mode (``GradientCheckpointingLayer``:
``self.gradient_checkpointing and self.training``) and rewards are always in eval mode, so rewardkit
wraps the blocks' ``forward`` itself for the duration of the call (``gradient_checkpointing``).
Gradients are bit-identical; the saved-activation saving is measured with ``saved_activations`` in
``tests/test_integrations_backprop.py`` and ``benchmarks/results/compose.md``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from rewardkit.precision import autocast_for, parse_dtype

__all__ = ["reward_loss", "gradient_checkpointing", "find_checkpoint_blocks", "saved_activations",
           "SavedTensorStats", "CHECKPOINT_BLOCK_PATHS"]

Reduction = Literal["mean", "sum", "none"]
NanPolicy = Literal["raise", "mask"]
# Module paths (suffixes of ``named_modules`` names) of the block lists that run on the image with grad.
CHECKPOINT_BLOCK_PATHS = (
    "vision_model.encoder.layers",  # transformers CLIPModel / CLIPVisionModelWithProjection (HF CLIP rewards)
    "visual.transformer.resblocks",  # open_clip VisionTransformer (HPSv2, BioCLIP, open_clip folders)
    "visual.trunk.blocks",  # open_clip TimmModel towers
    "visual_encoder.blocks",  # BLIP ViT (ImageReward, rewardkit.nets.blip)
    "text_encoder.encoder.layer",  # BLIP's image-grounded text encoder: cross-attends to the image (ImageReward)
)
_FP32_NAMES = ("fp32", "float32", "float", "exact")
_PATCH_MARK = "_rk_checkpointed"


def reward_loss(
    reward: Any,
    images: torch.Tensor,
    prompts: str | list[str] | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    checkpoint: bool | Sequence[nn.Module] = False,
    reduction: Reduction = "mean",
    scale: float = 1.0,
    nan_policy: NanPolicy = "raise",
    **context: Any,
) -> torch.Tensor:
    """The reward-backprop loss: ``-scale * reward`` (``+scale * score`` for lower-is-better rewards), reduced.

    Args:
        reward: a RewardFn with ``differentiable=True`` (a built-in reward, a composed reward whose
            parts are all differentiable, or any module declaring it).
        images: float ``(B, 3, H, W)`` in ``[0, 1]`` carrying the graph to the generator (e.g. the VAE
            decode of DRaFT's last steps).
        prompts: one string, ``B`` strings, or ``None`` for prompt-free rewards.
        dtype: ``None`` leaves precision as the reward was loaded (and to any enclosing autocast);
            ``"bf16"`` / ``"fp16"`` runs the call under ``torch.autocast`` on ``images.device``'s type;
            ``"fp32"`` disables autocast for the call (DRaFT+'s ``precision: 32``). Rewards that manage
            their own precision (an ``autocast_dtype`` attribute: the CLIP family) are switched to the
            same dtype for the call, so their prompt-embedding caches are keyed by the precision used.
        checkpoint: ``True`` checkpoints the reward's image-tower blocks (``find_checkpoint_blocks``);
            a sequence of modules checkpoints those instead.
        reduction: ``"mean"`` (default), ``"sum"``, or ``"none"`` for per-row losses ``(B,)``.
        scale: multiplies the loss (AlignProp's ``loss_coeff``, ReFL's ``grad_scale``).
        nan_policy: a NaN score means "could not score this row". ``"raise"`` (default) raises
            ``ValueError``; ``"mask"`` drops those rows: ``mean``/``sum`` over the finite rows only, NaN
            kept in ``reduction="none"`` rows, and the gradient reaching ``images`` through the reward
            is exactly zero for them (even where the reward's own backward would give NaN).
        **context: forwarded to the reward (e.g. ``reference=`` images).

    Returns:
        float32 loss: a scalar, or ``(B,)`` for ``reduction="none"``, on the reward's output device.

    Raises:
        TypeError: the reward is not differentiable.
        ValueError: bad options, a wrong score shape, NaN rows under ``nan_policy="raise"``, or every
            row NaN under ``"mask"``.
        RuntimeError: a reward declared differentiable returned scores without a gradient.
    """
    name = _check_differentiable(reward)
    _check_options(name, reduction, nan_policy, scale)
    keep: dict[str, torch.Tensor] = {}
    gated = images
    if nan_policy == "mask" and images.requires_grad and torch.is_grad_enabled():
        gated = _RowGate.apply(images, keep)
    tower_ckpt = gradient_checkpointing(reward, None if checkpoint is True else checkpoint) if checkpoint \
        else contextlib.nullcontext()
    with _precision(reward, images.device, dtype), tower_ckpt:
        scores = reward(gated, prompts, **context)
    scores = torch.as_tensor(scores).float()
    if scores.shape != (images.shape[0],):
        raise ValueError(f"reward_loss: {name} returned scores of shape {tuple(scores.shape)}, expected "
                         f"({images.shape[0]},); a RewardFn returns one score per image")
    if torch.is_grad_enabled() and images.requires_grad and not scores.requires_grad:
        raise RuntimeError(f"reward_loss: {name} declares differentiable=True but its scores carry no gradient "
                           "to the images; check that the reward does not detach, round or run under no_grad")
    factor = -scale if getattr(reward, "higher_is_better", True) else scale
    finite = torch.isfinite(scores)
    if bool(finite.all()):
        if reduction == "none":
            return factor * scores
        return factor * (scores.mean() if reduction == "mean" else scores.sum())
    rows = (~finite).nonzero().flatten().tolist()
    if nan_policy == "raise":
        raise ValueError(f"reward_loss: {name} gave non-finite scores for rows {rows}; fix the inputs, or pass "
                         "nan_policy='mask' to leave those rows out of the loss")
    keep["rows"] = finite
    if reduction == "none":
        return torch.where(finite, factor * scores, torch.full_like(scores, math.nan))
    if not bool(finite.any()):
        raise ValueError(f"reward_loss: {name} gave non-finite scores for every row; nothing to backpropagate")
    total = torch.where(finite, scores, torch.zeros_like(scores)).sum()
    return factor * (total / finite.sum() if reduction == "mean" else total)


class _RowGate(torch.autograd.Function):
    """Identity in the forward; in the backward zeroes the rows that ``keep["rows"]`` marks False.

    The mask is only known after the reward ran, so it is passed through a mutable dict.
    """

    @staticmethod
    def forward(ctx: Any, images: torch.Tensor, keep: dict) -> torch.Tensor:
        ctx.keep = keep
        return images.view_as(images)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        rows = ctx.keep.get("rows")
        if rows is None:
            return grad, None
        mask = rows.to(grad.device).view(-1, *([1] * (grad.ndim - 1)))
        return torch.where(mask, grad, torch.zeros_like(grad)), None


def _check_differentiable(reward: Any) -> str:
    name = getattr(reward, "name", type(reward).__name__)
    if not callable(reward):
        raise TypeError(f"reward_loss: expected a RewardFn, got {type(reward).__name__}")
    flag = getattr(reward, "differentiable", None)
    if flag is None:
        raise TypeError(f"reward_loss: {name} has no 'differentiable' attribute; set reward.differentiable = True "
                        "if its scores carry a gradient to the images")
    if not flag:
        raise TypeError(f"reward_loss: {name} is not differentiable (differentiable=False), so it cannot be "
                        "backpropagated (DRaFT / AlignProp / ReFL); use a differentiable reward (pickscore, hpsv2, "
                        "aesthetic, clip-score, ...) or a policy-gradient method (rewardkit.integrations.ddpo)")
    return name


def _check_options(name: str, reduction: str, nan_policy: str, scale: float) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reward_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if nan_policy not in ("raise", "mask"):
        raise ValueError(f"reward_loss: nan_policy must be 'raise' or 'mask', got {nan_policy!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"reward_loss: scale must be a finite number, got {scale!r} (for {name})")


def _modules(reward: Any) -> list[Any]:
    return list(reward.modules()) if isinstance(reward, nn.Module) else [reward]


@contextlib.contextmanager
def _precision(reward: Any, device: torch.device, dtype: Any) -> Iterator[None]:
    """Autocast (or its absence, for fp32) around the call, with self-managed rewards switched alike."""
    if dtype is None:
        yield
        return
    force_fp32 = isinstance(dtype, str) and dtype.lower() in _FP32_NAMES or dtype == torch.float32
    if force_fp32:
        _check_fp32_weights(reward)
    target = None if force_fp32 else parse_dtype(dtype)
    managed = [(m, m.autocast_dtype) for m in _modules(reward) if hasattr(m, "autocast_dtype")]
    try:
        for module, _ in managed:
            module.autocast_dtype = target
        with autocast_for(device, target):  # target None: autocast off (exact fp32)
            yield
    finally:
        for module, previous in managed:
            module.autocast_dtype = previous


def _check_fp32_weights(reward: Any) -> None:
    """An fp32 loss needs fp32 weights: a reward loaded in the fast mode holds its matmul weights in bf16/fp16
    (``precision.cast_matmul_weights``), which no autocast setting turns back into the exact model."""
    low = sorted({str(p.dtype) for m in _modules(reward) if isinstance(m, nn.Module)
                  for p in m.parameters() if p.dtype in (torch.bfloat16, torch.float16)})
    if low:
        name = getattr(reward, "name", type(reward).__name__)
        raise ValueError(f"reward_loss: dtype='fp32' asked, but {name} holds {', '.join(low)} weights (loaded with "
                         f"dtype='bf16'/'fp16'); load it with dtype=None for an fp32 loss, or drop dtype=")


def find_checkpoint_blocks(reward: Any) -> list[nn.Module]:
    """The transformer blocks that see the image inside ``reward`` (shared towers listed once).

    Looks for the module paths in ``CHECKPOINT_BLOCK_PATHS``: image towers, and BLIP's image-grounded
    text encoder. CLIP text towers are not included (the CLIP rewards encode prompts without grad and
    cache them, so they store no activations).
    """
    blocks: dict[int, nn.Module] = {}
    for module in _modules(reward):
        if not isinstance(module, nn.Module):
            continue
        for name, child in module.named_modules():
            if any(name == path or name.endswith("." + path) for path in CHECKPOINT_BLOCK_PATHS):
                for block in child:
                    blocks.setdefault(id(block), block)
    return list(blocks.values())


@contextlib.contextmanager
def gradient_checkpointing(reward: Any, modules: Sequence[nn.Module] | None = None) -> Iterator[list[nn.Module]]:
    """Checkpoint ``modules`` (default: ``find_checkpoint_blocks(reward)``) for the duration of the block.

    Each module's ``forward`` is replaced by an instance attribute that calls the original through
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` when grad is enabled (and directly
    otherwise); on exit the original is restored. Works in eval mode, keeps module hooks outside the
    checkpoint, nests (already-wrapped modules are left alone). The patch is visible to every thread:
    do not score the same reward instance on another thread (e.g. an ``AsyncRewardScorer``) meanwhile.

    Yields:
        The list of checkpointed modules.

    Raises:
        ValueError: no blocks were found and none were given.
    """
    blocks = list(modules) if modules is not None else find_checkpoint_blocks(reward)
    if not blocks:
        name = getattr(reward, "name", type(reward).__name__)
        raise ValueError(f"gradient_checkpointing: found no image-tower blocks in {name} (looked for "
                         f"{CHECKPOINT_BLOCK_PATHS}); pass checkpoint=[module, ...] with the blocks to recompute")
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for block in blocks:
            if getattr(block.__dict__.get("forward"), _PATCH_MARK, False):
                continue  # an enclosing gradient_checkpointing already wraps it
            patched.append((block, block.__dict__.get("forward")))
            block.forward = _checkpointed(block.forward)
        yield blocks
    finally:
        for block, previous in reversed(patched):
            if previous is None:
                del block.forward
            else:
                block.forward = previous


def _checkpointed(forward: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return _torch_checkpoint(forward, *args, use_reentrant=False, **kwargs)

    setattr(run, _PATCH_MARK, True)
    return run


@dataclass
class SavedTensorStats:
    """What autograd saved for the backward pass while ``saved_activations`` was active.

    Attributes:
        count: distinct storages saved (a tensor saved by several ops counts once).
        bytes: their total size in bytes.
    """

    count: int = 0
    bytes: int = 0


@contextlib.contextmanager
def saved_activations(exclude: nn.Module | None = None) -> Iterator[SavedTensorStats]:
    """Measure the tensors autograd keeps for the backward pass of the code in the block.

    Uses ``torch.autograd.graph.saved_tensors_hooks``; storages are de-duplicated and those of
    ``exclude``'s parameters and buffers (weights saved for the backward, not activations) are left
    out. Under ``gradient_checkpointing`` the checkpointed blocks' inputs are counted (the
    checkpoint saves them) and their inner activations are not (they are recomputed).

    Yields:
        A ``SavedTensorStats`` filled in when the block exits.
    """
    weights = set()
    if exclude is not None:
        weights = {t.untyped_storage().data_ptr() for t in [*exclude.parameters(), *exclude.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    stats = SavedTensorStats()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield stats
    finally:
        stats.count, stats.bytes = len(seen), sum(seen.values())
