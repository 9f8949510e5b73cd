"""Loading shared by the CLIP-family rewards: checkpoint formats, the shared-tower cache, fast-mode copies.

Checkpoint formats understood (detected from the files, never from the reward's name):

* a Hugging Face folder (``config.json`` + ``model.safetensors`` / sharded / ``pytorch_model.bin``,
  tokenizer and ``preprocessor_config.json``): loaded into ``transformers.CLIPModel``;
* an open_clip hub folder (``open_clip_config.json`` + ``open_clip_model.safetensors`` /
  ``open_clip_pytorch_model.bin``): loaded into ``open_clip.CLIP``;
* a single file with HF keys (``text_model.*``, ``vision_model.*``; DiffSynth-Studio's
  ``ImageMetrics`` re-uploads add ``*.position_ids``, which are dropped) or open_clip keys
  (``visual.*``; upstream HPS ``.pt`` files wrap them in ``{"state_dict": ...}``). A single file
  carries no architecture: the reward's default is used unless ``config=`` is given.

Every load is strict (``rewardkit.weights.load_state_dict_strict``). Towers loaded from the same weights
are shared between rewards (``_SHARED``, keyed on the files' content fingerprint, :func:`content_key`), and
fast-mode rewards share one low-precision copy per dtype (:func:`fast_towers`). Scoring lives in
``rewardkit.rewards.clip_common``.
"""

from __future__ import annotations

import json
import threading
import weakref
from pathlib import Path
from typing import Any

import torch

from rewardkit.nets.clip import ClipTowers, HFClipTowers, OpenClipTowers, build_open_clip_model
from rewardkit.precision import cast_matmul_weights, route_attention_through_sdpa
from rewardkit.weights import (
    drop_keys,
    load_state_dict_strict,
    read_state_dict,
    resolve_weights,
)

__all__ = ["ClipCheckpoint", "load_clip_checkpoint", "load_hf_towers_from_state", "content_key", "fast_towers",
           "HF_FOLDER_PATTERNS", "OPEN_CLIP_FOLDER_PATTERNS"]

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
# Everything a CLIP folder needs except weights in other formats (saves GBs of duplicate downloads).
HF_FOLDER_PATTERNS = ["*.json", "*.txt", "model.safetensors*", "model-*.safetensors"]
OPEN_CLIP_FOLDER_PATTERNS = ["*.json", "*.txt", "open_clip_model.safetensors"]
# Position ids are buffers that older transformers saved and newer ones recompute.
HF_DROPPED_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


class ClipCheckpoint:
    """A loaded CLIP model plus what its files said about preprocessing.

    Attributes:
        towers: the ``ClipTowers`` adapter (frozen, eval mode).
        fmt: ``"hf"`` or ``"open_clip"``.
        image_mean, image_std: normalisation stored with the weights (``None`` if not stored).
        resize_size: shortest-edge resize stored with the weights (``None`` if not stored).
        source: the resolved local path (for caching and error messages).
    """

    def __init__(self, towers: ClipTowers, fmt: str, source: Path, preprocess_cfg: dict[str, Any]) -> None:
        self.towers = towers
        self.fmt = fmt
        self.source = source
        self.image_mean = preprocess_cfg.get("mean")
        self.image_std = preprocess_cfg.get("std")
        self.resize_size = preprocess_cfg.get("resize_size")
        # open_clip's preprocess_cfg keys; checked by spec_for so that nothing unsupported passes silently.
        self.interpolation = preprocess_cfg.get("interpolation", "bicubic")
        self.resize_mode = preprocess_cfg.get("resize_mode", "shortest")


# Towers shared between rewards loaded from the same weights (e.g. clip-score and aesthetic on one ViT-L/14).
# Keyed on what identifies the *content* (``content_key``) plus what changes the built model (vision_only),
# so a file replaced at the same path is loaded again instead of serving the old weights (issue 13.3).
_SHARED: weakref.WeakValueDictionary[tuple[Any, bool], ClipTowers] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()
# Fast-mode copies of shared towers, per (exact towers, dtype): a fast reward never shares an exact tower
# (its weights are cast to bf16/fp16), and two fast rewards on the same weights share one copy.
_FAST: weakref.WeakKeyDictionary[ClipTowers, dict[torch.dtype, ClipTowers]] = weakref.WeakKeyDictionary()
# Files of a weight folder that identify its content (weights, architecture, tokenizer/preprocessor configs).
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt")


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    """``(name, size, mtime_ns, inode)`` of a file, following symlinks (hub snapshots link into blobs)."""
    info = path.stat()
    return path.name, info.st_size, info.st_mtime_ns, info.st_ino


def content_key(path: Path) -> tuple:
    """What identifies the weights at ``path`` without reading them: resolved path + stat of every file.

    Size, mtime (ns) and inode change when a file is rewritten or replaced (``cp``, ``mv``, a fresh
    download), which is what makes a cached tower stale. Hashing (sha256) would also catch a same-size
    rewrite with a forged mtime, but costs seconds per GB on every load of multi-GB CLIP towers, so
    the stat fingerprint is used. For a folder: the same over its weight/config files (not recursive).
    """
    resolved = path.resolve()
    if not resolved.is_dir():
        return str(resolved), _stat_key(resolved)
    files = sorted(p for p in resolved.iterdir() if p.suffix in _IDENTITY_SUFFIXES and p.is_file())
    return str(resolved), tuple(_stat_key(p) for p in files)


def fast_towers(towers: ClipTowers, dtype: torch.dtype | None) -> ClipTowers:
    """``towers`` for exact mode (``dtype=None``); else a shared copy whose matmul weights are ``dtype``.

    The copy is made once per (towers, dtype) and lives as long as a reward holds it; the exact towers are
    never modified, so exact-mode rewards on the same weights keep their float32 scores. The copy's
    ``nn.MultiheadAttention`` (open_clip) runs through SDPA (``precision.SdpaSelfAttention``).
    """
    if dtype is None:
        return towers
    import copy

    with _SHARED_LOCK:
        per_dtype = _FAST.setdefault(towers, {})
        if dtype not in per_dtype:
            fast = copy.deepcopy(towers)
            fast._rk_preprocess_cfg = getattr(towers, "_rk_preprocess_cfg", {})
            per_dtype[dtype] = route_attention_through_sdpa(cast_matmul_weights(fast, dtype))
        return per_dtype[dtype]


def _hf_folder_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        merged: dict[str, torch.Tensor] = {}
        for shard in shards:
            merged.update(read_state_dict(folder / shard))
        return merged
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    raise FileNotFoundError(f"{folder}: a Hugging Face CLIP folder needs one of {HF_WEIGHT_FILES}")


def _detect_key_format(state: dict[str, torch.Tensor], path: Path) -> str:
    if any(k.startswith(("text_model.", "vision_model.")) for k in state):
        return "hf"
    if any(k.startswith("visual.") for k in state):
        return "open_clip"
    sample = ", ".join(list(state)[:5])
    raise ValueError(
        f"{path}: not a CLIP checkpoint (expected HF keys 'vision_model.*' or open_clip keys 'visual.*', "
        f"found {sample} ...)"
    )


def _hf_preprocess_cfg(folder: Path | None) -> dict[str, Any]:
    if folder is None or not (folder / "preprocessor_config.json").is_file():
        return {}
    raw = json.loads((folder / "preprocessor_config.json").read_text())
    size = raw.get("size")
    resize = size.get("shortest_edge") if isinstance(size, dict) else size
    return {"mean": raw.get("image_mean"), "std": raw.get("image_std"), "resize_size": resize}


def _build_hf_model(config: Any, vision_only: bool) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    if isinstance(config, dict):
        config = CLIPConfig(**config)
    if not vision_only:
        return CLIPModel(config)
    vision_config = config.vision_config
    vision_config.projection_dim = config.projection_dim
    return CLIPVisionModelWithProjection(vision_config)


def _load_hf(state, config, tokenizer_dir: Path | None, vision_only: bool, name: str) -> HFClipTowers:
    model = _build_hf_model(config, vision_only)
    dropped = set(HF_DROPPED_KEYS)
    if vision_only:  # An image-only reward ignores a full checkpoint's text side.
        dropped |= {k for k in state if k.startswith(("text_model.", "text_projection.")) or k == "logit_scale"}
    load_state_dict_strict(model, drop_keys(state, dropped), name=name)
    tokenizer = None
    if not vision_only:
        if tokenizer_dir is None:
            raise FileNotFoundError(
                f"{name}: no tokenizer found next to the weights; pass processor='hf:owner/repo' or a local "
                f"folder with {' or '.join(TOKENIZER_FILES)}"
            )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return HFClipTowers(model.eval().requires_grad_(False), tokenizer)


def load_hf_towers_from_state(state: dict[str, torch.Tensor], config: Any, *, name: str) -> HFClipTowers:
    """An image-only HF tower from an in-memory state dict (merged checkpoints such as DiffSynth's Aesthetic)."""
    return _load_hf(state, config, None, True, name)


def _open_clip_tokenizer(model_cfg: dict[str, Any]) -> Any:
    import open_clip

    text_cfg = model_cfg.get("text_cfg", {})
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    context_length = text_cfg.get("context_length", 77)
    if text_cfg.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length, **kwargs)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length, **kwargs)


def _load_open_clip(state, model_cfg: dict[str, Any], name: str) -> OpenClipTowers:
    model = build_open_clip_model(model_cfg)
    load_state_dict_strict(model, state, name=name)
    return OpenClipTowers(model.eval().requires_grad_(False), _open_clip_tokenizer(model_cfg))


def _has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES)


def load_clip_checkpoint(
    weights: Any,
    *,
    name: str,
    default_config: Any,
    config: Any = None,
    processor: Any = None,
    fallback_processor: Any = None,
    vision_only: bool = False,
) -> ClipCheckpoint:
    """Load CLIP towers from any supported format (see module docstring).

    Args:
        weights: weight spec (local path, ``hf:``, ``ms:``).
        name: the reward name, for error messages.
        default_config: architecture for single-file checkpoints: an HF ``CLIPConfig`` kwargs dict
            (HF keys) or an open_clip model name / config dict (open_clip keys), as a dict
            ``{"hf": ..., "open_clip": ...}``.
        config: user override of the architecture (same forms).
        processor: where the tokenizer/preprocessor files are (overrides files next to the weights).
        fallback_processor: used when neither ``processor`` nor files next to the weights exist
            (upstream PickScore takes its processor from the laion CLIP-H repository).
        vision_only: build only the image tower (aesthetic).
    """
    path = resolve_weights(weights, allow_patterns=HF_FOLDER_PATTERNS + OPEN_CLIP_FOLDER_PATTERNS, what=name)
    key = (content_key(path), vision_only)
    with _SHARED_LOCK:
        for candidate in ((key[0], False), key):  # an image-only reward may reuse full towers
            cached = _SHARED.get(candidate)
            if cached is not None and config is None and processor is None:
                fmt = "hf" if isinstance(cached, HFClipTowers) else "open_clip"
                return ClipCheckpoint(cached, fmt, path, getattr(cached, "_rk_preprocess_cfg", {}))
    if processor is None and not vision_only and not _has_tokenizer(path if path.is_dir() else path.parent):
        processor = fallback_processor
    checkpoint = _load_uncached(path, name, default_config, config, processor, vision_only)
    checkpoint.towers._rk_preprocess_cfg = {
        "mean": checkpoint.image_mean, "std": checkpoint.image_std, "resize_size": checkpoint.resize_size,
        "interpolation": checkpoint.interpolation, "resize_mode": checkpoint.resize_mode,
    }
    if config is None and processor is None:
        with _SHARED_LOCK:
            _SHARED[key] = checkpoint.towers
    return checkpoint


def _load_uncached(path: Path, name, default_config, config, processor, vision_only) -> ClipCheckpoint:
    def tokenizer_dir() -> Path | None:  # resolved only for HF checkpoints, after the format is known
        if processor is None:
            return None
        return resolve_weights(processor, allow_patterns=["*.json", "*.txt"], what=f"{name} processor")

    if path.is_dir() and (path / "config.json").is_file():
        from transformers import CLIPConfig

        hf_config = config or CLIPConfig.from_pretrained(str(path))
        folder = tokenizer_dir() or path
        towers = _load_hf(_hf_folder_state_dict(path), hf_config, folder, vision_only, name)
        return ClipCheckpoint(towers, "hf", path, _hf_preprocess_cfg(folder))
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        raw = json.loads((path / "open_clip_config.json").read_text())
        model_cfg = config or raw["model_cfg"]
        weight_file = next((path / f for f in OPEN_CLIP_WEIGHT_FILES if (path / f).is_file()), None)
        if weight_file is None:
            raise FileNotFoundError(f"{name}: {path} has open_clip_config.json but none of {OPEN_CLIP_WEIGHT_FILES}")
        towers = _load_open_clip(read_state_dict(weight_file), model_cfg, name)
        return ClipCheckpoint(towers, "open_clip", path, raw.get("preprocess_cfg", {}))
    if path.is_dir():
        raise FileNotFoundError(
            f"{name}: {path} is neither a Hugging Face CLIP folder (config.json) nor an open_clip folder "
            "(open_clip_config.json); pass the checkpoint file itself"
        )
    state = read_state_dict(path, unwrap=("state_dict",))
    fmt = _detect_key_format(state, path)
    arch = config if config is not None else default_config.get(fmt)
    if arch is None:
        raise ValueError(f"{name}: {path} has {fmt} keys but no default architecture for them; pass config=")
    if fmt == "hf":
        folder = tokenizer_dir() or (path.parent if _has_tokenizer(path.parent) else None)
        towers = _load_hf(state, arch, folder, vision_only, name)
        return ClipCheckpoint(towers, "hf", path, _hf_preprocess_cfg(folder))
    if isinstance(arch, str):
        import open_clip

        arch = open_clip.get_model_config(arch)
    return ClipCheckpoint(_load_open_clip(state, arch, name), "open_clip", path, {})
