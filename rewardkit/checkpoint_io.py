"""Checkpoint files: sha256 (streamed, cached), reading a flat state dict from ``.safetensors`` or
``.pt/.pth/.bin/.ckpt`` (``weights_only=True``), strict loading with a readable mismatch report, and key renaming
helpers. Public through ``rewardkit.weights``, which resolves and downloads the files these read.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import pickle
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

_TORCH_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt"})
_HASH_CHUNK = 1 << 20  # bytes read per step when hashing
_LIST_LIMIT = 10  # keys shown per category in mismatch messages
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed; cached per (resolved path, size, mtime_ns)."""
    resolved = pathlib.Path(path).expanduser().resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(resolved, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise ``ValueError`` unless the file's sha256 equals ``expected`` (hex, any case)."""
    want = expected.strip().lower()
    actual = file_sha256(path)
    if actual != want:
        raise ValueError(
            f"sha256 mismatch for {str(path)!r}: expected {want}, got {actual}; the file is corrupt or "
            "truncated, or a different version: delete it and download again, or pass the matching file"
        )


def read_state_dict(path: str | os.PathLike, *, unwrap: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` state dict on CPU from ``.safetensors`` or ``.pt/.pth/.bin/.ckpt``.

    Args:
        path: a checkpoint file.
        unwrap: keys under which a wrapped checkpoint keeps its state dict (e.g. ``("state_dict", "model")``);
            a present key whose value is a dict is descended into, repeatedly.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a folder, an unknown suffix, an unreadable file, or content that is not a flat state dict.
    """
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in _TORCH_SUFFIXES | {".safetensors"})
        raise ValueError(f"{str(path)!r} is a folder; pass one checkpoint file inside it (found: {found or 'none'})")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in _TORCH_SUFFIXES:
        raise ValueError(f"{str(path)!r}: unknown checkpoint suffix; expected .safetensors, .pt, .pth, .bin or .ckpt")
    from safetensors.torch import load_file

    try:
        if suffix == ".safetensors":
            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad header, refused pickle global, ...
        hint = ("; it holds objects other than tensors: re-save only the tensors (model.state_dict())"
                if isinstance(exc, pickle.UnpicklingError) else "")
        raise ValueError(
            f"cannot read checkpoint {str(path)!r} ({type(exc).__name__}: {exc}){hint}; "
            "if the file is truncated or corrupt, download it again"
        ) from exc
    for _ in range(len(unwrap)):
        key = next((k for k in unwrap if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    return _check_flat(obj, path)


def _check_flat(obj: Any, path: pathlib.Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, expected a dict of tensors (a state dict)")
    bad = [(k, v) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
        shown = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in bad[:_LIST_LIMIT])
        hint = f"; the state dict is probably under one of {nested}" if nested else ""
        raise ValueError(f"{str(path)!r} is not a flat state dict of str -> Tensor; found {shown}{hint}")
    return dict(obj)


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model (raised by :func:`load_state_dict_strict`)."""

    def __init__(self, message: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 shape_conflicts: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.missing, self.unexpected, self.shape_conflicts = list(missing), list(unexpected), list(shape_conflicts)


def _listed(items: list[str]) -> str:
    more = f", ... ({len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
    return "[" + ", ".join(items[:_LIST_LIMIT]) + more + "]"


def load_state_dict_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, name: str,
                           key_map: Callable[[dict], dict] | None = None, hint: str = "") -> None:
    """Load ``state_dict`` (after ``key_map``) into ``module`` strictly; dtypes are cast by the copy.

    Raises:
        CheckpointMismatchError: any missing key, unexpected key or shape conflict, all listed.
    """
    mapped = dict(key_map(dict(state_dict))) if key_map is not None else dict(state_dict)
    expected = module.state_dict()
    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in mapped if k not in expected]
    conflicts = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if k in expected and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or conflicts:
        message = (
            f"{name}: checkpoint does not match the model: {len(missing)} missing keys {_listed(missing)}, "
            f"{len(unexpected)} unexpected keys {_listed(unexpected)}, "
            f"{len(conflicts)} shape conflicts {_listed(conflicts)}"
        )
        if conflicts:
            message += ("; the checkpoint has a different architecture; "
                        "pass config=... to rk.load to build a matching model")
        if hint:
            message += f"; {hint}"
        raise CheckpointMismatchError(message, missing, unexpected, conflicts)
    module.load_state_dict(mapped, strict=True)


def _rekey(state_dict: Mapping[str, Any], new_key: Callable[[str], str]) -> dict:
    out: dict = {}
    for key, value in state_dict.items():
        renamed = new_key(key)
        if renamed in out:
            raise ValueError(f"key conversion maps two keys to {renamed!r} (last from {key!r}); fix the key map")
        out[renamed] = value
    return out


def rename_prefixes(state_dict: Mapping[str, Any], mapping: Sequence[tuple[str, str]]) -> dict:
    """Replace the first matching old prefix of each key by its new prefix; other keys are kept."""
    return _rekey(state_dict, lambda k: next((new + k[len(old):] for old, new in mapping if k.startswith(old)), k))


def strip_prefixes(state_dict: Mapping[str, Any], prefixes: Sequence[str]) -> dict:
    """Strip each listed prefix from each key at most once, in the order given."""

    def new_key(key: str) -> str:
        for prefix in prefixes:
            key = key.removeprefix(prefix)
        return key

    return _rekey(state_dict, new_key)


def drop_keys(state_dict: Mapping[str, Any], keys_or_predicate: Iterable[str] | Callable[[str], bool]) -> dict:
    """Drop exact keys (an iterable; a single string is one key) or keys for which a predicate is true."""
    if callable(keys_or_predicate):
        drop = keys_or_predicate
    else:
        names = {keys_or_predicate} if isinstance(keys_or_predicate, str) else set(keys_or_predicate)
        drop = names.__contains__
    return {k: v for k, v in state_dict.items() if not drop(k)}
