"""DiffSynth-Studio's ``ModelConfig`` and where its weights come from, for ``rewardkit.compat.diffsynth``.

:class:`ModelConfig` maps DiffSynth's ``path`` / ``model_id`` + ``origin_file_pattern`` (and its
``DIFFSYNTH_*`` environment variables) to a rewardkit weight spec: an existing local copy under
``<base>/<model_id>/`` is used in place, anything else is fetched through ``rewardkit.weights``.
:func:`sidecar_options` reads the optional ``rewardkit.json`` of ``rewardkit.load`` options beside local
weights (``rewardkit.compat.diffsynth``'s module docstring says how the metrics use it).

Import the public names from ``rewardkit.compat.diffsynth`` (or ``rewardkit.metrics``), which re-exports them;
this module imports no other compat module.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rewardkit import weights as _weights

__all__ = ["ModelConfig", "IMAGE_METRICS_REPO", "DEFAULT_BASE_PATH", "SIDECAR_NAME", "sidecar_options"]

IMAGE_METRICS_REPO = "DiffSynth-Studio/ImageMetrics"  # the default repo of every diffsynth/metrics/*.py
DEFAULT_BASE_PATH = "./models"  # diffsynth/core/loader/config.py reset_local_model_path
_SOURCES = {"modelscope": "ms", "huggingface": "hf"}
_TRUE = ("1", "true", "yes", "on")
SIDECAR_NAME = "rewardkit.json"  # optional rewardkit.load options beside local weights (module docstring)


@dataclass
class ModelConfig:
    """DiffSynth's ``ModelConfig``, mapped to a rewardkit weight spec by :meth:`to_spec`.

    ``path`` wins; else ``model_id`` + ``origin_file_pattern`` name a file (globs allowed), a folder
    (pattern ending in ``/``) or the whole repo (``None``, ``""``, ``"./"``). An existing
    ``<base>/<model_id>/<pattern>`` is used in place, with ``<base>`` = ``$DIFFSYNTH_MODEL_BASE_PATH``, else
    ``local_model_path``, else ``./models`` (as DiffSynth); otherwise ``download_source`` (else
    ``$DIFFSYNTH_DOWNLOAD_SOURCE``, else ``"modelscope"``) picks ``ms:`` or ``hf:``. ``skip_download`` (else
    ``$DIFFSYNTH_SKIP_DOWNLOAD``) makes a missing local copy an error. ``computation_device`` /
    ``computation_dtype`` override ``device`` / ``torch_dtype``; the other memory fields are ignored.
    """

    path: str | list[str] | None = None
    model_id: str | None = None
    origin_file_pattern: str | None = None
    download_source: str | None = None
    local_model_path: str | None = None
    skip_download: bool | None = None
    offload_device: Any = None
    offload_dtype: Any = None
    onload_device: Any = None
    onload_dtype: Any = None
    preparing_device: Any = None
    preparing_dtype: Any = None
    computation_device: Any = None
    computation_dtype: Any = None
    clear_parameters: bool = False
    state_dict: Any = None
    quantize: Any = None

    def _pattern(self) -> str | None:
        return None if self.origin_file_pattern in (None, "", "./") else self.origin_file_pattern

    def _is_folder_or_glob(self) -> bool:
        pattern = self._pattern()
        return pattern is not None and (pattern.endswith("/") or any(c in pattern for c in "*?["))

    def base_path(self) -> Path:
        """``$DIFFSYNTH_MODEL_BASE_PATH``, else ``local_model_path``, else ``./models``."""
        return Path(os.environ.get("DIFFSYNTH_MODEL_BASE_PATH") or self.local_model_path or DEFAULT_BASE_PATH)

    def local_match(self) -> Path | None:
        """``<base>/<model_id>/<pattern>`` if already there (a non-empty folder, or one glob match)."""
        root, pattern = self.base_path() / str(self.model_id), self._pattern()
        if pattern is None or pattern.endswith("/"):
            folder = root / (pattern or "")
            return folder if folder.is_dir() and any(folder.iterdir()) else None
        matches = sorted(glob.glob(str(root / pattern)))
        if len(matches) > 1:
            raise ValueError(f"ModelConfig: {root / pattern} matches {len(matches)} files {matches[:4]}; "
                             "rewardkit loads one file or one folder: name the file or its folder")
        return Path(matches[0]) if matches else None

    def source(self) -> str:
        """``"ms"`` or ``"hf"``, from ``download_source`` / ``$DIFFSYNTH_DOWNLOAD_SOURCE`` (any case)."""
        name = self.download_source or os.environ.get("DIFFSYNTH_DOWNLOAD_SOURCE") or "modelscope"
        if name.lower() not in _SOURCES:
            raise ValueError(f"ModelConfig: download_source should be 'modelscope' or 'huggingface', got {name!r}")
        return _SOURCES[name.lower()]

    def to_spec(self) -> str:
        """A rewardkit weight spec: a local path, or ``ms:``/``hf:`` + ``model_id`` [+ ``/pattern``].

        Raises:
            ValueError: no ``path`` nor ``model_id``, several paths, or ``state_dict`` / ``quantize`` set.
            FileNotFoundError: downloads skipped and no local copy.
        """
        if self.state_dict is not None or self.quantize is not None:
            raise ValueError("ModelConfig: state_dict= and quantize= are not supported by rewardkit; pass a path")
        if self.path is not None:
            paths = [self.path] if isinstance(self.path, (str, os.PathLike)) else list(self.path)
            if len(paths) != 1:
                raise ValueError(f"ModelConfig: rewardkit loads one file or folder, got path={self.path!r}; "
                                 "pass the folder that holds the shards")
            return str(paths[0])
        if self.model_id is None:
            raise ValueError('ModelConfig: pass path="..." or model_id="owner/repo" (+ origin_file_pattern="...")')
        local = self.local_match()
        if local is not None:
            return str(local)
        skip = self.skip_download
        if skip is None:
            skip = os.environ.get("DIFFSYNTH_SKIP_DOWNLOAD", "").strip().lower() in _TRUE
        if skip:
            raise FileNotFoundError(f"ModelConfig: downloads are skipped and {self.base_path() / self.model_id}/"
                                    f"{self._pattern() or ''} does not exist; download it or unset skip_download")
        pattern = self._pattern()
        return f"{self.source()}:{self.model_id}" + (f"/{pattern}" if pattern else "")

    def resolve(self, allow_patterns: Sequence[str] | None = None) -> Path:
        """A local file or folder, downloaded through ``rewardkit.weights`` if needed.

        Args:
            allow_patterns: for a folder or whole repo, which files to fetch (relative to it); ``None`` = all.
        """
        spec = self.to_spec()
        patterns = None if allow_patterns is None else list(allow_patterns)
        pattern = self._pattern()
        is_glob = pattern is not None and any(c in pattern for c in "*?[")
        if _weights.parse_weight_spec(spec).kind == "local" or not is_glob:  # files and "sub/folder/" specs
            return _weights.resolve_weights(spec, allow_patterns=patterns, what="ModelConfig")
        repo = _weights.resolve_weights(f"{self.source()}:{self.model_id}", allow_patterns=[str(pattern)],
                                        what="ModelConfig")
        matches = sorted(glob.glob(str(repo / str(pattern))))
        if len(matches) != 1:
            raise FileNotFoundError(f"ModelConfig: {self.model_id}/{pattern} matched {len(matches)} files, need 1")
        return Path(matches[0])


def _model_weights(config: ModelConfig) -> str:
    """A spec ``rk.load`` can resolve: hub folders and globs are fetched here, files are left to the loader."""
    spec = config.to_spec()
    if _weights.parse_weight_spec(spec).kind != "local" and config._is_folder_or_glob():
        return str(config.resolve())
    return spec


def _default(pattern: str, like: ModelConfig) -> ModelConfig:
    """A ``DiffSynth-Studio/ImageMetrics`` file or folder, fetched from where ``like`` says."""
    return ModelConfig(model_id=IMAGE_METRICS_REPO, origin_file_pattern=pattern, download_source=like.download_source,
                       local_model_path=like.local_model_path, skip_download=like.skip_download)


def sidecar_options(weights: Any) -> dict[str, Any]:
    """The ``rewardkit.load`` options in ``SIDECAR_NAME`` beside local ``weights``; ``{}`` without one.

    Args:
        weights: a local file or folder, or a hub spec (never has a sidecar).

    Raises:
        ValueError: the file is not a JSON object.
    """
    if not isinstance(weights, (str, os.PathLike)) or not Path(weights).exists():
        return {}
    path = Path(weights)
    sidecar = (path if path.is_dir() else path.parent) / SIDECAR_NAME
    if not sidecar.is_file():
        return {}
    options = json.loads(sidecar.read_text(encoding="utf-8"))
    if not isinstance(options, dict):
        raise ValueError(f"{sidecar}: expected a JSON object of rewardkit.load options, got {type(options).__name__}; "
                         "write e.g. {\"config\": {...}} or delete the file")
    return options


def _with_sidecar(weights: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` completed (never overridden) by the sidecar beside ``weights``; changed in place."""
    for key, value in sidecar_options(weights).items():
        options.setdefault(key, value)
    return options
