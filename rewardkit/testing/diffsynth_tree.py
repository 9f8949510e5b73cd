"""A tiny, offline copy of DiffSynth-Studio's ``./models`` tree: every metric's default files, random weights.

DiffSynth's metrics load ``ModelConfig(model_id=..., origin_file_pattern=...)`` from
``<base>/<model_id>/<pattern>``, ``<base>`` being ``$DIFFSYNTH_MODEL_BASE_PATH`` or ``./models``
(``rewardkit.compat.diffsynth.ModelConfig``). :func:`build_diffsynth_tree` writes, at those exact relative
paths, the tiny checkpoints of ``rewardkit.testing`` in DiffSynth's file formats, so that a DiffSynth-style
script runs offline after changing only its import::

    models/DiffSynth-Studio/ImageMetrics/
        PickScore/model.safetensors (+ tokenizer, preprocessor)      CLIP-ViT-H-14-laion2B-s32B-b79K/ (same)
        HPSv2/model.safetensors          Aesthetic/model.safetensors          BioCLIPv2/open_clip_model.safetensors
        ImageReward/model.safetensors (+ BERT tokenizer)             HPSv3/model.safetensors (+ processor)
        FID/model.safetensors            LPIPS/alexnet.safetensors
        UnifiedReward-2.0-qwen35-9b/model-00001-of-00001.safetensors (+ index, config, processor)
        UnifiedReward-Edit-qwen3vl-8b/model-00001-of-00001.safetensors (+ ...)
    models/Qwen/Qwen-Image-Bench/model-00001-of-00001.safetensors (+ ...)

The tiny models carry their sizes: every folder whose checkpoint needs ``rewardkit.load`` options beyond the
weights (a ``config`` for a single weights file, short answers for the random judges) gets a ``rewardkit.json``
sidecar with them, which the compat loaders read as defaults (``rewardkit.compat.diffsynth.SIDECAR_NAME``).
Real DiffSynth files have no sidecar and load as before. The judges' weights are renamed to a one-shard
``model-00001-of-00001.safetensors`` with its ``model.safetensors.index.json`` (what
``origin_file_pattern="model-*.safetensors"`` matches in the released folders; transformers loads the index).

Example:
    >>> import rewardkit.testing as rkt
    >>> base = rkt.build_diffsynth_tree("/tmp/rk-ds/models", metrics=["pickscore"])
    >>> # DIFFSYNTH_MODEL_BASE_PATH=/tmp/rk-ds/models, then PickScoreMetric.from_pretrained(...) loads it
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["DIFFSYNTH_TREE_METRICS", "IMAGE_METRICS_FOLDERS", "build_diffsynth_tree"]

IMAGE_METRICS_REPO = "DiffSynth-Studio/ImageMetrics"  # rewardkit.compat.diffsynth.IMAGE_METRICS_REPO
QIB_REPO = "Qwen/Qwen-Image-Bench"  # rewardkit.compat.diffsynth_qwen_image_bench.QIB_REPO
SIDECAR_NAME = "rewardkit.json"  # rewardkit.compat.diffsynth.SIDECAR_NAME (testing must not import compat)
# The folders of the compat classes' default origin_file_pattern (rewardkit/compat/diffsynth*.py).
IMAGE_METRICS_FOLDERS = {
    "pickscore": "PickScore", "clip": "CLIP-ViT-H-14-laion2B-s32B-b79K", "hpsv2": "HPSv2", "aesthetic": "Aesthetic",
    "bioclip": "BioCLIPv2", "imagereward": "ImageReward", "hpsv3": "HPSv3", "fid": "FID", "lpips": "LPIPS",
    "unified-reward-2": "UnifiedReward-2.0-qwen35-9b", "unified-reward-edit": "UnifiedReward-Edit-qwen3vl-8b",
}
DIFFSYNTH_TREE_METRICS = (*IMAGE_METRICS_FOLDERS, "qwen-image-bench")
_SHARD = "model-00001-of-00001.safetensors"  # HF shard naming (transformers' modeling_utils)
_INDEX = "model.safetensors.index.json"


def _write_sidecar(folder: Path, options: dict[str, Any]) -> None:
    """``folder/rewardkit.json``: the ``rewardkit.load`` options besides the weights (nothing when none)."""
    if options:
        (folder / SIDECAR_NAME).write_text(json.dumps(options, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A tiny builder's ``rk.load`` kwargs without the weights path (what the sidecar carries)."""
    return {key: value for key, value in kwargs.items() if key != "weights"}


def _as_one_shard(folder: Path) -> None:
    """Rename ``model.safetensors`` to a one-shard ``model-00001-of-00001.safetensors`` plus its index."""
    from safetensors import safe_open

    single = folder / "model.safetensors"
    with safe_open(str(single), framework="pt") as handle:
        keys = sorted(handle.keys())
    single.rename(folder / _SHARD)
    index = {"metadata": {"total_size": (folder / _SHARD).stat().st_size}, "weight_map": dict.fromkeys(keys, _SHARD)}
    (folder / _INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")


def _move(source: str | Path, target: Path) -> Path:
    """Move a built folder into place (replacing an older copy)."""
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(target))
    return target


def _clip_family(name: str) -> Callable[[Path, Path, int], None]:
    def build(repo: Path, staging: Path, seed: int) -> None:
        from rewardkit.testing.clip import tiny_aesthetic, tiny_bioclip, tiny_hpsv2, tiny_pickscore
        from rewardkit.testing.hpsv3 import tiny_hpsv3
        from rewardkit.testing.imagereward import tiny_imagereward

        builder = {"pickscore": tiny_pickscore, "hpsv2": tiny_hpsv2, "aesthetic": tiny_aesthetic,
                   "bioclip": tiny_bioclip, "imagereward": tiny_imagereward, "hpsv3": tiny_hpsv3}[name]
        kwargs = builder(repo, layout="diffsynth", seed=seed)
        _write_sidecar(Path(kwargs["weights"]).parent, _options(kwargs))

    return build


def _clip(repo: Path, staging: Path, seed: int) -> None:
    """CLIP score's folder: DiffSynth stores it in PickScore's format (HF ``CLIPModel`` keys + position_ids)."""
    from rewardkit.testing.clip import tiny_pickscore

    kwargs = tiny_pickscore(staging, layout="diffsynth", seed=seed)
    folder = _move(Path(kwargs["weights"]).parent, repo / IMAGE_METRICS_FOLDERS["clip"])
    _write_sidecar(folder, _options(kwargs))


def _fid(repo: Path, staging: Path, seed: int) -> None:
    from rewardkit.testing.fid import tiny_fid_inception

    tiny_fid_inception(repo, layout="diffsynth", seed=seed)  # full-size network: no options needed


def _lpips(repo: Path, staging: Path, seed: int) -> None:
    from rewardkit.testing.lpips import tiny_lpips

    tiny_lpips(repo, layout="diffsynth", seed=seed, net="alex")  # LPIPSMetric's default net


def _judge(name: str) -> Callable[[Path, Path, int], None]:
    def build(repo: Path, staging: Path, seed: int) -> None:
        from rewardkit.testing.qwen_image_bench import tiny_qwen_image_bench
        from rewardkit.testing.unified_reward import tiny_unified_reward_2, tiny_unified_reward_edit

        builder = {"unified-reward-2": tiny_unified_reward_2, "unified-reward-edit": tiny_unified_reward_edit,
                   "qwen-image-bench": tiny_qwen_image_bench}[name]
        kwargs = builder(staging / name, seed=seed)
        target = repo.parents[1] / QIB_REPO if name == "qwen-image-bench" else repo / IMAGE_METRICS_FOLDERS[name]
        folder = _move(kwargs["weights"], target)
        _as_one_shard(folder)
        _write_sidecar(folder, _options(kwargs))

    return build


_BUILDERS: dict[str, Callable[[Path, Path, int], None]] = {
    **{name: _clip_family(name) for name in ("pickscore", "hpsv2", "aesthetic", "bioclip", "imagereward", "hpsv3")},
    "clip": _clip, "fid": _fid, "lpips": _lpips,
    **{name: _judge(name) for name in ("unified-reward-2", "unified-reward-edit", "qwen-image-bench")},
}


def build_diffsynth_tree(base: str | Path = "./models", metrics: Iterable[str] | None = None, seed: int = 0) -> Path:
    """Write tiny random checkpoints where DiffSynth's default ``ModelConfig`` s look for them under ``base``.

    Args:
        base: DiffSynth's model base path (``./models`` by default, as DiffSynth; or the value of
            ``$DIFFSYNTH_MODEL_BASE_PATH``); created if missing.
        metrics: which of ``DIFFSYNTH_TREE_METRICS`` to write (default all twelve). The FID network is
            full size (about 95 MB); the judges are tiny Qwen VLM folders (a few MB each).
        seed: weight seed (each builder's own offset is added, so the towers differ).

    Returns:
        ``base`` as a ``Path``.

    Raises:
        ValueError: an unknown metric name.
    """
    wanted = list(DIFFSYNTH_TREE_METRICS if metrics is None else metrics)
    unknown = sorted(set(wanted) - set(DIFFSYNTH_TREE_METRICS))
    if unknown:
        raise ValueError(f"build_diffsynth_tree: unknown metrics {unknown}; choose from {list(DIFFSYNTH_TREE_METRICS)}")
    base = Path(base)
    repo = base / IMAGE_METRICS_REPO
    repo.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix=".rewardkit-staging-") as staging:
        for offset, name in enumerate(DIFFSYNTH_TREE_METRICS):
            if name in wanted:
                _BUILDERS[name](repo, Path(staging), seed + offset)
    return base
