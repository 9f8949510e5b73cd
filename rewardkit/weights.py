"""Weight I/O: resolve a weight spec (local path, ``hf:`` or ``ms:`` repo), verify sha256, load strictly.

Accepted spec forms: a local file or folder; ``hf:owner/repo``, ``hf:owner/repo/sub/file.safetensors``,
``hf:owner/repo@revision/file``; the same with ``ms:`` for ModelScope; an ``https://`` URL of one file
(cached in torch.hub's ``checkpoints`` folder, the folder torchvision, pytorch-fid and lpips use, so a
file one of them already downloaded is reused). ``huggingface_hub`` and
``modelscope`` are imported only when a download is asked for, so ``import rewardkit`` stays light.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch

__all__ = ["CheckpointMismatchError", "WeightSource", "drop_keys", "file_sha256", "is_offline",
           "load_state_dict_strict", "parse_weight_spec", "read_state_dict", "rename_prefixes",
           "resolve_weights", "strip_prefixes", "verify_sha256"]

_SPEC_FORMS = (
    "a local file or folder path, 'hf:owner/repo', 'hf:owner/repo/path/in/repo.safetensors', "
    "'hf:owner/repo@revision/path/in/repo.safetensors', 'hf:owner/repo/sub/folder/' (a folder in the repo), "
    "the same with 'ms:' for ModelScope, or an https:// URL of one file"
)
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "REWARDKIT_OFFLINE")
_TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
_TORCH_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt"})
_HASH_CHUNK = 1 << 20  # bytes read per step when hashing
_LIST_LIMIT = 10  # keys shown per category in mismatch messages
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class WeightSource:
    """Where weights live. ``filename`` is a path inside the repo (None = whole repo / the local path)."""

    kind: Literal["local", "hf", "ms", "url"]
    location: str
    filename: str | None
    revision: str | None = None


def _spec_str(src: WeightSource) -> str:
    if src.kind in ("local", "url"):
        return src.location
    rev = f"@{src.revision}" if src.revision else ""
    return f"{src.kind}:{src.location}{rev}" + (f"/{src.filename}" if src.filename else "")


def parse_weight_spec(spec: str | os.PathLike) -> WeightSource:
    """Parse a weight spec string or path into a :class:`WeightSource`.

    Raises:
        ValueError: a malformed ``hf:`` / ``ms:`` spec (missing owner or repo, empty segment or revision).
        TypeError: a spec that is neither a string nor a path.
    """
    if isinstance(spec, os.PathLike):
        return WeightSource("local", str(pathlib.Path(spec).expanduser()), None)
    if not isinstance(spec, str):
        raise TypeError(f"weight spec must be a str or path, got {type(spec).__name__}; expected {_SPEC_FORMS}")
    if spec.startswith(("https://", "http://")):
        return WeightSource("url", spec, None)
    kind = spec[:2]
    if kind not in ("hf", "ms") or spec[2:3] != ":":
        return WeightSource("local", str(pathlib.Path(spec).expanduser()), None)
    parts = spec[3:].rstrip("/").split("/")
    owner, repo, rest = parts[0], (parts[1] if len(parts) > 1 else ""), parts[2:]
    repo, at, revision = repo.partition("@")
    if not owner or not repo or "@" in owner or (at and not revision) or any(not p for p in rest):
        raise ValueError(f"malformed weight spec {spec!r}; accepted forms: {_SPEC_FORMS}")
    # A trailing "/" after a path inside the repo names a sub-folder ("hf:owner/repo/PickScore/").
    filename = "/".join(rest) + ("/" if rest and spec.endswith("/") else "") or None
    return WeightSource(kind, f"{owner}/{repo}", filename, revision or None)  # type: ignore[arg-type]


def _folder_patterns(src: WeightSource, allow_patterns: list[str] | None) -> list[str] | None:
    """Download patterns of a whole-repo (``None`` filename) or sub-folder (filename ending in ``/``) spec."""
    if src.filename is None:
        return allow_patterns
    return [src.filename + pattern for pattern in (allow_patterns or ["*"])]


def _is_folder(src: WeightSource) -> bool:
    return src.filename is None or src.filename.endswith("/")


def _in_snapshot(root: str, src: WeightSource) -> pathlib.Path:
    return pathlib.Path(root) / (src.filename or "").rstrip("/")


def _offline_vars_set() -> list[str]:
    return [var for var in _OFFLINE_VARS if os.environ.get(var, "").strip().lower() in _TRUE_VALUES]


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``REWARDKIT_OFFLINE`` is set to 1/true/yes/on (any case)."""
    return bool(_offline_vars_set())


def _fix(src: WeightSource) -> str:
    """Message tail: whether offline mode is on, and how to fix a weight that cannot be resolved."""
    on = _offline_vars_set()
    note = (f"; offline mode is on ({', '.join(on)} set): Hugging Face and ModelScope downloads are disabled "
            "and only the local cache was searched") if on else ""
    fetch = "hf download" if src.kind == "hf" else "modelscope download --model"
    target = src.location + (f" {src.filename}" if src.filename else "")
    unset = f", or unset {'/'.join(on)} to allow downloads" if on else ""
    return f"{note}; fix: download it first (`{fetch} {target}`), or pass a local path with weights=...{unset}"


def _resolve_hf(src: WeightSource, allow_patterns: list[str] | None, what: str) -> pathlib.Path:
    import huggingface_hub
    from huggingface_hub import errors

    offline = is_offline()
    looked = f"{what}: {_spec_str(src)}"
    try:
        if not _is_folder(src):
            out = huggingface_hub.hf_hub_download(
                repo_id=src.location, filename=src.filename, revision=src.revision, local_files_only=offline
            )
        else:
            out = _in_snapshot(huggingface_hub.snapshot_download(
                repo_id=src.location, revision=src.revision, allow_patterns=_folder_patterns(src, allow_patterns),
                local_files_only=offline,
            ), src)
    except errors.LocalEntryNotFoundError as exc:
        raise FileNotFoundError(f"{looked} is not in the local Hugging Face cache{_fix(src)}") from exc
    except (errors.EntryNotFoundError, errors.RevisionNotFoundError, errors.RepositoryNotFoundError) as exc:
        reason = {
            errors.RevisionNotFoundError: f"revision {src.revision!r} does not exist",
            errors.GatedRepoError: "the repo is gated: accept its terms on huggingface.co and log in (`hf auth login`)",
            errors.RepositoryNotFoundError: "the repo does not exist or is private (log in with `hf auth login`)",
        }.get(type(exc), "the file does not exist in the repo")
        raise FileNotFoundError(f"{looked} was not found: {reason}{_fix(src)}") from exc
    except (errors.HfHubHTTPError, ConnectionError) as exc:  # ConnectionError covers OfflineModeIsEnabled
        raise RuntimeError(f"{looked} could not be downloaded ({exc}){_fix(src)}") from exc
    return pathlib.Path(out)


def _resolve_ms(src: WeightSource, allow_patterns: list[str] | None, what: str) -> pathlib.Path:
    try:
        import modelscope
    except ImportError as exc:
        raise ImportError(f'{what}: {_spec_str(src)} needs ModelScope; pip install "rewardkit[modelscope]"') from exc
    # modelscope >= 1.15 reads its cache with local_files_only. Its model_file_download still asks the server for
    # the default revision first when none is given (failure is caught inside modelscope; it may cost a timeout).
    offline = {"local_files_only": True} if is_offline() else {}
    looked = f"{what}: {_spec_str(src)}"
    try:
        if not _is_folder(src):
            out = modelscope.model_file_download(src.location, src.filename, revision=src.revision, **offline)
        else:
            out = _in_snapshot(modelscope.snapshot_download(
                src.location, revision=src.revision, allow_patterns=_folder_patterns(src, allow_patterns), **offline
            ), src)
    except Exception as exc:  # modelscope's error classes differ between versions
        kind = type(exc).__name__
        missing = isinstance(exc, FileNotFoundError) or "NotExist" in kind or "NotFound" in kind or is_offline()
        err = FileNotFoundError if missing else RuntimeError
        raise err(f"{looked} could not be resolved ({type(exc).__name__}: {exc}){_fix(src)}") from exc
    return pathlib.Path(out)


def _resolve_url(src: WeightSource, what: str) -> pathlib.Path:
    """Download one file by URL into torch.hub's checkpoint folder (once), like torchvision does."""
    import re
    import urllib.parse

    name = pathlib.PurePosixPath(urllib.parse.urlparse(src.location).path).name
    if not name:
        raise ValueError(f"{what}: URL {src.location!r} does not end in a file name")
    target = pathlib.Path(torch.hub.get_dir()) / "checkpoints" / name
    if target.is_file():
        return target
    on = _offline_vars_set()
    if on:
        raise FileNotFoundError(
            f"{what}: {src.location} is not in the local cache ({target}) and offline mode is on "
            f"({', '.join(on)} set); download it there first, pass a local path with weights=..., "
            f"or unset {'/'.join(on)}"
        )
    # torch.hub's convention: "name-<8+ hex digits>.ext" carries a sha256 prefix that is checked.
    match = re.search(r"-([a-f0-9]{8,})\.", name)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(src.location, str(target), hash_prefix=match.group(1) if match else None)
    except Exception as exc:  # network errors come in many types; keep the cause chained
        raise RuntimeError(f"{what}: downloading {src.location} failed ({type(exc).__name__}: {exc}); "
                           f"download it to {target} yourself or pass a local path with weights=...") from exc
    return target


def resolve_weights(spec: str | os.PathLike, *, allow_patterns: list[str] | None = None,
                    sha256: str | None = None, what: str = "weights") -> pathlib.Path:
    """Resolve a weight spec to a local file or folder, downloading through the hub client if needed.

    Args:
        spec: see :func:`parse_weight_spec`.
        allow_patterns: glob patterns limiting a whole-repo download (ignored for single files).
        sha256: expected hex digest; verified when the result is a file (folders are not hashed).
        what: what is being looked for, used in error messages (e.g. ``"PickScore weights"``).

    Raises:
        FileNotFoundError: a missing local path, or a repo / file / revision that cannot be found.
        RuntimeError: a download that failed for another reason (network, server).
        ImportError: an ``ms:`` spec without modelscope installed.
        ValueError: a malformed spec or a sha256 mismatch.
    """
    src = parse_weight_spec(spec)
    if src.kind == "local":
        path = pathlib.Path(src.location)
        if not path.exists():
            raise FileNotFoundError(
                f"{what}: local path {str(path)!r} does not exist; pass an existing file or folder, "
                f"or a hub spec ({_SPEC_FORMS})"
            )
    elif src.kind == "url":
        path = _resolve_url(src, what)
    elif src.kind == "hf":
        path = _resolve_hf(src, allow_patterns, what)
    else:
        path = _resolve_ms(src, allow_patterns, what)
    if sha256 is not None and path.is_file():
        verify_sha256(path, sha256)
    return path


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
