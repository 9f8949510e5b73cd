"""Benchmark evaluation of a text-to-image pipeline: seeded images, every reward, set metrics, any number of ranks.

``run_evaluation`` generates one image per (prompt, seed) row, each rank its contiguous shard
(``periodic_eval.shard_range``, accelerate's ``split_between_processes`` convention, uneven and empty
shards allowed) with one ``torch.Generator`` per row (``generation.generate_images``), so an image
depends only on its prompt and seed. Each rank saves its images as PNG, scores them with every reward
and feeds them to the set metrics (FID / KID / CMMD / ...); then the per-image scores are gathered
(``feature_store.gather_rows``, padded, so uneven shards are safe: ``reference/rl_integration.md``
section 4) and the set metrics are reduced with their own ``sync`` (float64 sums, or every feature
row). Metrics that share one extractor object (FID and KID on one Inception) embed each image once,
as ``rewardkit fid`` does (``rewardkit/cli_metrics.py`` ``run_fid``).

Upstream shape: clean-fid ``cleanfid/fid.py`` ``compute_fid(gen=...)`` (features of generated images
computed on the fly against stored reference statistics) and flow_grpo ``scripts/train_sd3.py``
``eval`` (fixed test prompts, rewards gathered over processes); here both run in one pass.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rewardkit.eval_report import KEY_COLUMNS
from rewardkit.integrations.periodic_eval import DEFAULT_BATCH_SIZE, rank_world, shard_range

__all__ = ["EvalResult", "run_evaluation", "set_metric_references", "KEY_COLUMNS"]

logger = logging.getLogger(__name__)

_MIN_SET_IMAGES = 2  # every set metric needs two images a side (rewardkit.metrics.fid.MIN_IMAGES)


@dataclass
class EvalResult:
    """What ``run_evaluation`` returns, identical on every rank.

    Attributes:
        rows: one dict per image in (prompt, seed) order: ``index``, ``prompt``, ``seed``, ``path``
            (the PNG, or ``None`` without ``image_dir``) and one float per score column (NaN = not scored).
        score_names: the score columns: each reward's key, then its parts for a composed reward.
        set_metrics: ``{name: {"value", "std" (KID-style [mean, std] metrics, else None), "n",
            "n_reference", "preset", "extractor"}}``.
        num_processes: how many ranks took part.
    """

    rows: list[dict[str, Any]]
    score_names: list[str]
    set_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_processes: int = 1


def _score_columns(rewards: Mapping[str, Any]) -> list[str]:
    """``[key, *parts]`` per reward; raises on a name used twice."""
    names: list[str] = []
    for key, reward in rewards.items():
        names += [key, *getattr(reward, "part_names", [])]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"run_evaluation: score columns {duplicated} appear twice (a reward key equals another "
                         "reward's key or a composed reward's part); rename the keys of rewards=")
    return names


def _reward_device(reward: Any) -> torch.device | None:
    if isinstance(reward, torch.nn.Module):
        param = next(reward.parameters(), None)
        return param.device if param is not None else None
    return None


def _score(reward: Any, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """``{"": scores (B,), part: raw part scores (B,), ...}`` as float64 on the CPU."""
    device = _reward_device(reward)
    images = images.to(device) if device is not None else images
    if hasattr(reward, "evaluate"):
        # A z-score composition must not learn from evaluation images; freezing per call (not by flipping
        # the shared ``update_stats`` flag) keeps a concurrent training call on another thread unaffected.
        options = {"update_stats": False} if getattr(reward, "stateful", False) else {}
        output = reward.evaluate(images, prompts, **options)
        scores, details = output.scores, output.details
    else:
        scores, details = reward(images, prompts), {}
    parts = {part: torch.as_tensor(details[part]) for part in getattr(reward, "part_names", [])}
    return {key: value.detach().double().cpu().reshape(-1) for key, value in {"": scores, **parts}.items()}


def _extractor_groups(set_metrics: Mapping[str, Any]) -> list[list[Any]]:
    """Metrics grouped by extractor object, so that each image is embedded once per extractor."""
    groups: dict[int, list[Any]] = {}
    for metric in set_metrics.values():
        groups.setdefault(id(metric.extractor), []).append(metric)
    return list(groups.values())


def _feed(groups: list[list[Any]], images: Any, real: bool) -> None:
    for members in groups:
        for features in members[0].iter_features(images):
            for member in members:
                member.update_features(features, real=real)


def set_metric_references(set_metrics: Mapping[str, Any], references: Mapping[str, Any] | None,
                          accelerator: Any = None) -> None:
    """Give each set metric its reference side; collective (every rank must call it).

    Args:
        set_metrics: ``{name: metric}``.
        references: ``{name: source}``: a statistics ``.npz`` (``rewardkit fid-stats``; with ``--features``
            for KID / CMMD), loaded on every rank; or images (folder, list of paths, tensor), sharded over
            ranks and added as the real side (summed over ranks by the metric's ``sync`` with the generated
            side). Metrics with a fixed reference already need no entry.

    Raises:
        ValueError: a metric without a reference, or a ``references`` key that is not a metric.
    """
    from rewardkit.integrations.callbacks import shard_source

    references = dict(references or {})
    unknown = sorted(set(references) - set(set_metrics))
    if unknown:
        raise ValueError(f"run_evaluation: references for {unknown}, which are not in set_metrics {sorted(set_metrics)}")
    image_sources: dict[tuple[int, str], tuple[Any, list[Any]]] = {}  # (extractor, source) -> metrics
    for name, metric in set_metrics.items():
        source = references.get(name)
        if source is None:
            if not getattr(metric, "has_fixed_reference", False) and not _real_count(metric):
                raise ValueError(f"run_evaluation: set metric {name!r} has no reference; pass references={{{name!r}: "
                                 "'stats.npz' or an image folder}} (stats from `rewardkit fid-stats DIR --out FILE`)")
        elif isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz"):
            _fix_reference(name, metric, source)
        else:
            key = (id(metric.extractor), str(source) if isinstance(source, (str, os.PathLike)) else str(id(source)))
            image_sources.setdefault(key, (source, []))[1].append(metric)
    rank, world = rank_world(accelerator)
    for source, members in image_sources.values():
        part, sharded = shard_source(source, rank, world)
        if (sharded and not len(part)) or (not sharded and rank != 0):
            continue  # an empty shard adds nothing; an unshardable source (a DataLoader) is read on rank 0 only
        _feed([members], part, real=True)  # the metrics' sync later sums the ranks' reference shards


def _fix_reference(name: str, metric: Any, path: str | os.PathLike) -> None:
    """Fix a metric's real side from a statistics file (Gaussian statistics, or stored feature rows)."""
    from rewardkit.metrics.frechet import load_statistics

    statistics, rows = load_statistics(path, identity=metric.extractor.identity())
    if hasattr(metric, "set_reference"):
        metric.set_reference(statistics)
    elif rows is None:
        raise ValueError(f"{path} holds no feature rows, which {name} needs; remake it with "
                         "`rewardkit fid-stats DIR --out FILE --features`")
    else:
        metric.set_reference_rows(rows.float())


def _real_count(metric: Any) -> int:
    real = getattr(metric, "real", None)
    return int(real.n) if real is not None else int(metric.store.count(True))


def _save_pngs(images: torch.Tensor, paths: Sequence[Path]) -> None:
    from rewardkit.eval_report import save_png

    for image, path in zip(images, paths):
        save_png(image, path)


def _generate_shard(pipeline: Any, prompts: list[str], seeds: list[int], indices: range, batch_size: int,
                    call_kwargs: dict[str, Any], rewards: Mapping[str, Any], groups: list[list[Any]],
                    image_dir: Path | None, columns: list[str]) -> torch.Tensor:
    """Generate, save, score and feed this rank's rows; returns ``(n, 1 + C)`` float64 ``[index, scores]``."""
    from rewardkit.integrations.generation import generate_images

    blocks = [torch.zeros(0, 1 + len(columns), dtype=torch.float64)]
    for start in range(indices.start, indices.stop, batch_size):
        chunk = range(start, min(start + batch_size, indices.stop))
        batch_prompts, batch_seeds = [prompts[i] for i in chunk], [seeds[i] for i in chunk]
        with torch.no_grad():
            images = generate_images(pipeline, batch_prompts, batch_seeds, **call_kwargs)
            if image_dir is not None:
                _save_pngs(images, [image_dir / _file_name(i, seeds[i]) for i in chunk])
            scores: dict[str, torch.Tensor] = {}
            for key, reward in rewards.items():
                scores.update({part or key: values for part, values in _score(reward, images, batch_prompts).items()})
        _feed(groups, images, real=False)
        index = torch.tensor(list(chunk), dtype=torch.float64)
        blocks.append(torch.stack([index, *(scores[name] for name in columns)], dim=1))
    return torch.cat(blocks)


def _file_name(index: int, seed: int) -> str:
    return f"{index:05d}_seed{seed}.png"


def _set_metric_values(set_metrics: Mapping[str, Any], accelerator: Any) -> dict[str, dict[str, Any]]:
    """Sync every metric (collective), compute, and describe each value."""
    values: dict[str, dict[str, Any]] = {}
    for name, metric in set_metrics.items():
        metric.sync(accelerator)
        result = [float(v) for v in metric.compute().reshape(-1)]
        reference = getattr(metric, "_reference", None)
        n_reference = int(reference.n) if reference is not None else (
            int(metric.side(True).shape[0]) if hasattr(metric, "side") else _real_count(metric))
        values[name] = {"value": result[0], "std": result[1] if len(result) == 2 else None,
                        "n": _fake_count(metric),
                        "n_reference": n_reference, "preset": metric.extractor.prep.preset,
                        "extractor": metric.extractor.name}
    return values


def run_evaluation(pipeline: Any, prompts: Sequence[str], seeds: Sequence[int], rewards: Mapping[str, Any] | None = None,
                   set_metrics: Mapping[str, Any] | None = None, *, accelerator: Any = None,
                   references: Mapping[str, Any] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                   call_kwargs: Mapping[str, Any] | None = None, image_dir: str | os.PathLike | None = None) -> EvalResult:
    """Generate, save, score and measure one image per (prompt, seed) row; collective over ranks.

    Call on **every** rank (the reductions are collectives). Use the unwrapped pipeline modules.

    Args:
        pipeline: a diffusers text-to-image pipeline (``generation.generate_images`` runs it).
        prompts: ``N`` prompts (repeat a prompt for several seeds).
        seeds: ``N`` integer seeds, one per prompt.
        rewards: ``{column: RewardFn}``; a composed reward adds one column per part (raw scores).
        set_metrics: ``{name: metric}`` (``FrechetDistance``, ``KID``, ``CMMD``, ...), whose generated side
            must be empty; their reference comes from ``references`` or is already fixed.
        accelerator: an ``accelerate.Accelerator`` (rank, world, reductions); ``None`` = the default
            ``torch.distributed`` group when initialised, else one process.
        references: see ``set_metric_references``.
        batch_size: images per pipeline call on a rank.
        call_kwargs: ``generate_images`` arguments (``num_inference_steps``, ``guidance_scale``, ``height``, ...).
        image_dir: where each rank writes its PNGs (``00007_seed3.png``); a folder every rank can see on
            multi-node runs. ``None`` saves nothing.

    Returns:
        An ``EvalResult`` (the same on every rank).

    Raises:
        ValueError: mismatched prompts / seeds, no prompts, fewer than 2 rows with set metrics, duplicate
            score columns, a set metric without a reference or with generated images already in it.
    """
    prompts, seeds = list(prompts), [int(seed) for seed in seeds]
    rewards, set_metrics = dict(rewards or {}), dict(set_metrics or {})
    _check_inputs(prompts, seeds, batch_size, set_metrics)
    columns = _score_columns(rewards)
    set_metric_references(set_metrics, references, accelerator)
    rank, world = rank_world(accelerator)
    folder = Path(image_dir) if image_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    local = _generate_shard(pipeline, prompts, seeds, shard_range(len(prompts), rank, world), batch_size,
                            dict(call_kwargs or {}), rewards, _extractor_groups(set_metrics), folder, columns)
    from rewardkit.metrics.feature_store import gather_rows

    gathered = gather_rows(local, accelerator)  # padded all-gather: uneven shards are safe
    rows = []
    for values in gathered[gathered[:, 0].argsort()].tolist():
        index = int(values[0])
        path = str(folder / _file_name(index, seeds[index])) if folder is not None else None
        rows.append({"index": index, "prompt": prompts[index], "seed": seeds[index], "path": path,
                     **dict(zip(columns, values[1:]))})
    logger.info("run_evaluation: %d images on %d process(es)", len(rows), world)
    return EvalResult(rows, columns, _set_metric_values(set_metrics, accelerator), world)


def _check_inputs(prompts: list[str], seeds: list[int], batch_size: int, set_metrics: Mapping[str, Any]) -> None:
    """Every check that can fail before generating anything."""
    if not prompts or len(prompts) != len(seeds):
        raise ValueError(f"run_evaluation: need N >= 1 prompts and one seed per prompt, got {len(prompts)} prompts "
                         f"and {len(seeds)} seeds")
    if batch_size < 1:
        raise ValueError(f"run_evaluation: batch_size must be >= 1, got {batch_size}")
    if set_metrics and len(prompts) < _MIN_SET_IMAGES:
        raise ValueError(f"run_evaluation: set metrics need at least {_MIN_SET_IMAGES} images, got {len(prompts)} "
                         "(prompt, seed) rows; add prompts or seeds")
    for name, metric in set_metrics.items():
        if _fake_count(metric):
            raise ValueError(f"run_evaluation: set metric {name!r} already holds generated images; "
                             "call reset(real=False)")


def _fake_count(metric: Any) -> int:
    fake = getattr(metric, "fake", None)
    return int(fake.n) if fake is not None else int(metric.store.count(False))
