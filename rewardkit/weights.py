"""Weight specs: resolve a local path, ``hf:`` or ``ms:`` repo or URL to files, with timeouts and a deadline.

Accepted spec forms: a local file or folder; ``hf:owner/repo``, ``hf:owner/repo/sub/file.safetensors``,
``hf:owner/repo@revision/file``; the same with ``ms:`` for ModelScope; an ``https://`` URL of one file
(cached in torch.hub's ``checkpoints`` folder, the folder torchvision, pytorch-fid and lpips use, so a
file one of them already downloaded is reused). ``huggingface_hub`` and
``modelscope`` are imported only when a download is asked for, so ``import rewardkit`` stays light.

Downloads never hang: each request waits at most ``REWARDKIT_DOWNLOAD_TIMEOUT`` seconds (default 30) to
connect or between bytes, and each weight download ends after ``REWARDKIT_DOWNLOAD_DEADLINE`` seconds (default
7200) in all, failing with :class:`DownloadTimeoutError` that names the URL, the limit and the offline fix.

Reading the resolved files (sha256, state dicts, strict loading) is ``rewardkit.checkpoint_io``'s job; its
functions are re-exported here, so ``rewardkit.weights`` stays the one public path.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

# Reading and strict loading of checkpoint files live in checkpoint_io (their own job); rewardkit.weights stays
# their public path.
from rewardkit.checkpoint_io import (
    CheckpointMismatchError,
    drop_keys,
    file_sha256,
    load_state_dict_strict,
    read_state_dict,
    rename_prefixes,
    strip_prefixes,
    verify_sha256,
)

__all__ = ["CheckpointMismatchError", "DownloadTimeoutError", "WeightSource", "download_limits", "drop_keys",
           "file_sha256", "is_offline",
           "load_state_dict_strict", "parse_weight_spec", "read_state_dict", "rename_prefixes",
           "resolve_weights", "strip_prefixes", "verify_sha256"]

_SPEC_FORMS = (
    "a local file or folder path, 'hf:owner/repo', 'hf:owner/repo/path/in/repo.safetensors', "
    "'hf:owner/repo@revision/path/in/repo.safetensors', 'hf:owner/repo/sub/folder/' (a folder in the repo), "
    "the same with 'ms:' for ModelScope, or an https:// URL of one file"
)
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "REWARDKIT_OFFLINE")
_TRUE_VALUES = frozenset({"1", "true", "yes", "on"})


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


# --- download limits -------------------------------------------------------------------------------
#: Seconds one request may wait to connect or between received bytes (env ``REWARDKIT_DOWNLOAD_TIMEOUT``).
DEFAULT_DOWNLOAD_TIMEOUT_S = 30.0
#: Seconds one weight download may take in all (env ``REWARDKIT_DOWNLOAD_DEADLINE``): 2 hours, e.g. the
#: 55 GB of a 27B judge at 8 MB/s; raise it for larger downloads on slower links.
DEFAULT_DOWNLOAD_DEADLINE_S = 7200.0
_TIMEOUT_VAR, _DEADLINE_VAR = "REWARDKIT_DOWNLOAD_TIMEOUT", "REWARDKIT_DOWNLOAD_DEADLINE"
_URL_CHUNK = 1 << 20  # bytes read per step of a URL download


class DownloadTimeoutError(RuntimeError):
    """A download that got no answer within the request timeout, or did not finish before the deadline."""


def download_limits() -> tuple[float, float]:
    """``(request timeout, overall deadline)`` in seconds, from the environment or the defaults.

    Raises:
        ValueError: a variable that is not a positive number.
    """
    limits = []
    for var, default in ((_TIMEOUT_VAR, DEFAULT_DOWNLOAD_TIMEOUT_S), (_DEADLINE_VAR, DEFAULT_DOWNLOAD_DEADLINE_S)):
        raw = os.environ.get(var, "").strip()
        try:
            value = float(raw) if raw else default
        except ValueError:
            value = -1.0
        if not value > 0 or value == float("inf"):
            raise ValueError(f"{var}={raw!r}: expected a positive number of seconds (default {default:g})")
        limits.append(value)
    return limits[0], limits[1]


def _timeout_message(what: str, url: str, why: str) -> str:
    return (f"{what}: {url} {why}; fix: pass a local path with weights=..., or set REWARDKIT_OFFLINE=1 to use only "
            f"the local cache, or raise {_TIMEOUT_VAR} / {_DEADLINE_VAR} (seconds) for a slow link")


def _is_network_error(exc: BaseException) -> bool:
    """Connection failures and timeouts of urllib, httpx (huggingface_hub) and requests (modelscope)."""
    names = {klass.__name__ for klass in type(exc).__mro__}
    return isinstance(exc, (OSError, TimeoutError)) or bool(names & {"TransportError", "TimeoutException",
                                                                      "ConnectionError", "Timeout"})


def _with_deadline(call: Callable[[], Any], deadline: float, what: str, url: str) -> Any:
    """Run ``call()`` in a daemon thread and wait at most ``deadline`` seconds for it.

    The hub clients have requests without a timeout (huggingface_hub's repo listing) and retry loops, so
    only a thread bounds their wall time. A download given up on keeps running in its daemon thread until
    its socket fails; it never blocks the process from exiting.
    """
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            result["error"] = exc

    thread = threading.Thread(target=work, name=f"rewardkit-download {url}", daemon=True)
    thread.start()
    thread.join(deadline)
    if thread.is_alive():
        raise DownloadTimeoutError(_timeout_message(what, url, f"did not finish within the {deadline:g} s deadline "
                                                               f"({_DEADLINE_VAR})"))
    if "error" in result:
        raise result["error"]
    return result["value"]


def _resolve_hf(src: WeightSource, allow_patterns: list[str] | None, what: str) -> pathlib.Path:
    import huggingface_hub
    from huggingface_hub import constants, errors

    looked = f"{what}: {_spec_str(src)}"
    timeout, deadline = download_limits()
    url = f"{constants.ENDPOINT}/{src.location}" + (
        f"/resolve/{src.revision or 'main'}/{src.filename}" if not _is_folder(src) else "")

    def fetch(local_only: bool) -> pathlib.Path:
        if not _is_folder(src):
            return pathlib.Path(huggingface_hub.hf_hub_download(
                repo_id=src.location, filename=src.filename, revision=src.revision, local_files_only=local_only,
                etag_timeout=timeout))
        return _in_snapshot(huggingface_hub.snapshot_download(
            repo_id=src.location, revision=src.revision, allow_patterns=_folder_patterns(src, allow_patterns),
            local_files_only=local_only, etag_timeout=timeout), src)

    def online() -> pathlib.Path:
        # huggingface_hub lists a repo with no request timeout, so one bounded request comes first: a server
        # that does not answer fails here within the timeout instead of at the deadline.
        try:
            huggingface_hub.HfApi().repo_info(src.location, revision=src.revision, timeout=timeout)
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError):
            raise
        except Exception as exc:  # no answer or a server error: use a cached copy, as huggingface_hub does
            try:
                path = fetch(True)
            except errors.LocalEntryNotFoundError:
                if isinstance(exc, errors.OfflineModeIsEnabled):  # HF_HUB_OFFLINE was set when it was imported
                    raise
                if _is_network_error(exc):
                    raise DownloadTimeoutError(_timeout_message(
                        what, url, f"did not answer within {timeout:g} s ({_TIMEOUT_VAR}; {type(exc).__name__})"
                    )) from exc
                raise exc from None
            warnings.warn(f"{looked}: {url} could not be reached ({type(exc).__name__}: {exc}); using the cached "
                          f"copy {path}", stacklevel=2)
            return path
        return fetch(False)

    try:
        out = fetch(True) if is_offline() else _with_deadline(online, deadline, what, url)
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
    return out


def _resolve_ms(src: WeightSource, allow_patterns: list[str] | None, what: str) -> pathlib.Path:
    try:
        import modelscope
    except ImportError as exc:
        raise ImportError(f'{what}: {_spec_str(src)} needs ModelScope; pip install "rewardkit[modelscope]"') from exc
    # modelscope >= 1.15 reads its cache with local_files_only. Its model_file_download still asks the server for
    # the default revision first when none is given (failure is caught inside modelscope; it may cost a timeout).
    offline = {"local_files_only": True} if is_offline() else {}
    looked = f"{what}: {_spec_str(src)}"
    # modelscope has its own request timeouts (MODELSCOPE_API_HTTP_CLIENT_TIMEOUT, read when it is imported)
    # and retries; the deadline bounds the whole call.
    url = f"https://{os.environ.get('MODELSCOPE_DOMAIN', 'modelscope.cn')}/models/{src.location}"

    def fetch() -> pathlib.Path:
        if not _is_folder(src):
            return pathlib.Path(modelscope.model_file_download(src.location, src.filename, revision=src.revision,
                                                               **offline))
        return _in_snapshot(modelscope.snapshot_download(
            src.location, revision=src.revision, allow_patterns=_folder_patterns(src, allow_patterns), **offline
        ), src)

    try:
        return fetch() if offline else _with_deadline(fetch, download_limits()[1], what, url)
    except DownloadTimeoutError:
        raise
    except Exception as exc:  # modelscope's error classes differ between versions
        kind = type(exc).__name__
        missing = isinstance(exc, FileNotFoundError) or "NotExist" in kind or "NotFound" in kind or is_offline()
        err = FileNotFoundError if missing else RuntimeError
        raise err(f"{looked} could not be resolved ({type(exc).__name__}: {exc}){_fix(src)}") from exc


def _download_url(url: str, target: pathlib.Path, hash_prefix: str | None, what: str) -> None:
    """Stream ``url`` into ``target`` (atomically) with a per-read timeout and an overall deadline.

    torch.hub's ``download_url_to_file`` (what torchvision uses) calls ``urlopen`` without a timeout, so a
    server that accepts and never answers blocks it forever; this is the same download with both limits.
    """
    import time
    import urllib.request

    timeout, deadline = download_limits()
    end = time.monotonic() + deadline
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "rewardkit"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(partial, "wb") as out:
            size = response.headers.get("Content-Length")
            received = 0
            while chunk := response.read1(_URL_CHUNK):  # one socket read each, so the deadline is checked often
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if time.monotonic() > end:
                    raise DownloadTimeoutError(_timeout_message(
                        what, url, f"did not finish within the {deadline:g} s deadline ({_DEADLINE_VAR})"))
        if size is not None and received != int(size):
            raise RuntimeError(f"{what}: {url} ended after {received} of {size} bytes; try again")
        if hash_prefix and not digest.hexdigest().startswith(hash_prefix):
            raise ValueError(f"{what}: {url} has sha256 {digest.hexdigest()}, not the {hash_prefix}... its name "
                             "promises; the download is corrupt or the file changed: try again")
        os.replace(partial, target)
    except (DownloadTimeoutError, RuntimeError, ValueError):
        raise
    except Exception as exc:  # urllib's errors come in many types; keep the cause chained
        if isinstance(exc, TimeoutError) or "timed out" in str(exc):
            raise DownloadTimeoutError(_timeout_message(
                what, url, f"did not answer within {timeout:g} s ({_TIMEOUT_VAR})")) from exc
        raise RuntimeError(f"{what}: downloading {url} failed ({type(exc).__name__}: {exc}); download it to "
                           f"{target} yourself or pass a local path with weights=...") from exc
    finally:
        partial.unlink(missing_ok=True)


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
    _download_url(src.location, target, match.group(1) if match else None, what)
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
        DownloadTimeoutError: (a ``RuntimeError``) no answer within ``REWARDKIT_DOWNLOAD_TIMEOUT`` seconds, or
            not finished within ``REWARDKIT_DOWNLOAD_DEADLINE`` (see :func:`download_limits`).
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
