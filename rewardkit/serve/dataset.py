"""Dataset-scale scoring on Ray Data (``rewardkit score --engine ray``): one actor per device, resumable.

Inputs are cut into shards: image files in chunks of ``shard_size`` (folders listed sorted, as the
single-process CLI lists them), one shard per Parquet file (an ``image`` column of encoded bytes or of
Hugging Face ``datasets`` ``{"bytes", "path"}`` structs, an optional ``prompt`` column, an optional ``key``
column naming the rows) and one per WebDataset ``.tar`` shard (samples grouped by key: ``<key>.png|jpg|...``
with ``<key>.txt`` or ``<key>.json`` ``{"prompt": ...}``). A Ray Data ``map_batches`` over the shard list
runs :class:`_ShardScorer` actors (each loads the rewards once, on its own device) that score a shard and
write its rows to ``<shard_dir>/<shard id>.jsonl`` (written to a temporary name, then renamed: a shard
file exists only when finished). A shard whose file exists is skipped, so a killed run resumes where it
stopped. Shard ids hash their inputs, so changed inputs are scored again.

Rows are those of the single-process ``rewardkit score``: ``image`` (the file path, or ``<dataset
file>#<key>``), ``prompt`` and one column per reward, scored by the same calls (``evaluate_pil`` on the
exact path, ``evaluate`` on the tensor path) in batches of ``batch_size`` within each shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["Shard", "DATASET_SUFFIXES", "is_dataset_file", "plan_shards", "read_shard", "score_with_ray"]

DATASET_SUFFIXES = (".parquet", ".tar")
DEFAULT_SHARD_SIZE = 512  # image files per shard (a Parquet / tar file is one shard whatever its size)


@dataclass(frozen=True)
class Shard:
    """One unit of work and of resumption: ``kind`` ``files`` (``paths`` + ``prompts``), ``parquet`` or
    ``webdataset`` (``source``)."""

    id: str
    kind: str
    source: str = ""
    paths: tuple[str, ...] = ()
    prompts: tuple[str, ...] | None = None


def is_dataset_file(spec: str | os.PathLike) -> bool:
    """Whether an ``--images`` entry is a Parquet file or a WebDataset tar shard."""
    return Path(spec).suffix.lower() in DATASET_SUFFIXES and Path(spec).is_file()


def _digest(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, default=str).encode("utf-8")).hexdigest()[:12]


def plan_shards(files: Sequence[Path], prompts: Sequence[str] | None, datasets: Sequence[Path],
                shard_size: int = DEFAULT_SHARD_SIZE) -> list[Shard]:
    """The shards of a run, in output order (files first, then datasets as given)."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    shards = []
    for number, start in enumerate(range(0, len(files), shard_size)):
        paths = tuple(str(p) for p in files[start : start + shard_size])
        texts = None if prompts is None else tuple(prompts[start : start + shard_size])
        shards.append(Shard(f"files-{number:05d}-{_digest(paths, texts)}", "files", paths=paths, prompts=texts))
    for path in map(Path, datasets):
        kind = "parquet" if path.suffix.lower() == ".parquet" else "webdataset"
        stat = path.resolve().stat()
        shards.append(Shard(f"{kind}-{path.stem}-{_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}",
                            kind, source=str(path)))
    return shards


def _open_image(data: bytes, where: str) -> Any:
    from PIL import Image

    from rewardkit.image_io import _DECODE_ERRORS, ImageLoadError, as_rgb

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now: the buffer closes with the block
            return as_rgb(image)
    except _DECODE_ERRORS as error:
        raise ImageLoadError(f"{where}: not a decodable image ({type(error).__name__}: {error})") from None


def _read_parquet(path: str) -> tuple[list[str], list[Any], list[str] | None]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "image" not in table.column_names:
        raise ValueError(f"{path}: a Parquet shard needs an 'image' column (encoded bytes or {{bytes, path}} structs), "
                         f"has {table.column_names}")
    cells = table.column("image").to_pylist()
    keys = table.column("key").to_pylist() if "key" in table.column_names else list(range(len(cells)))
    images = [_open_image(c["bytes"] if isinstance(c, dict) else c, f"{path}#{k}") for c, k in zip(cells, keys)]
    prompts = table.column("prompt").to_pylist() if "prompt" in table.column_names else None
    return [f"{path}#{k}" for k in keys], images, prompts


def _read_webdataset(path: str) -> tuple[list[str], list[Any], list[str] | None]:
    from rewardkit.image_io import IMAGE_EXTENSIONS

    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as archive:
        for member in archive:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, dot, extension = base.partition(".")  # webdataset: the key ends at the first dot of the name
            if dot:
                samples.setdefault(f"{folder}/{stem}" if folder else stem, {})[extension.lower()] = \
                    archive.extractfile(member).read()
    keys, images, prompts = [], [], []
    for key, parts in samples.items():
        found = [ext for ext in parts if f".{ext}" in IMAGE_EXTENSIONS]
        if len(found) != 1:
            raise ValueError(f"{path}: sample {key!r} has {len(found)} images ({sorted(parts)}); a sample needs exactly one")
        keys.append(f"{path}#{key}")
        images.append(_open_image(parts[found[0]], f"{path}#{key}"))
        text = parts["txt"].decode("utf-8") if "txt" in parts else \
            json.loads(parts["json"]).get("prompt") if "json" in parts else None
        prompts.append(text)
    have = [p is not None for p in prompts]
    if any(have) and not all(have):
        raise ValueError(f"{path}: {have.count(False)} of {len(have)} samples have no .txt / .json prompt; give every sample one")
    return keys, images, prompts if any(have) else None


def read_shard(shard: Shard) -> tuple[list[str], list[Any], list[str] | None]:
    """``(row keys, RGB PIL images, prompts or None)`` of a shard."""
    if shard.kind == "files":
        from rewardkit.image_io import load_images

        return list(shard.paths), load_images(list(shard.paths)), None if shard.prompts is None else list(shard.prompts)
    return _read_parquet(shard.source) if shard.kind == "parquet" else _read_webdataset(shard.source)


class _ShardScorer:
    """A Ray Data actor: loads the rewards once, then scores one shard per call and writes its rows."""

    def __init__(self, names: list[str], load: dict[str, Any], shard_dir: str, batch_size: int, preprocess: str) -> None:
        from rewardkit.registry import load as load_reward

        device = load["device"] or ("cuda" if load["use_gpu"] else None)  # Ray gave this actor its GPU
        if load["tiny_root"] is not None:
            from rewardkit.testing import load_tiny

            self.rewards = {n: load_tiny(n, load["tiny_root"], device=device, dtype=load["dtype"]) for n in names}
        else:
            self.rewards = {n: load_reward(n, weights=load["weights"].get(n), device=device, dtype=load["dtype"])
                            for n in names}
        self.device, self.shard_dir, self.batch_size, self.preprocess = device, Path(shard_dir), batch_size, preprocess

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        done = []
        for text in batch["shard"]:
            shard = Shard(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()})
            keys, images, prompts = read_shard(shard)
            scores = _score(self.rewards, images, prompts, self.batch_size, self.preprocess, self.device)
            rows = [{"image": key, "prompt": None if prompts is None else prompts[i],
                     **{n: None if not math.isfinite(scores[n][i]) else scores[n][i] for n in self.rewards}}
                    for i, key in enumerate(keys)]
            final = self.shard_dir / f"{shard.id}.jsonl"
            partial = final.with_suffix(f".part{os.getpid()}")
            partial.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
            partial.replace(final)  # atomic: a shard file exists only when the shard is finished
            done.append(shard.id)
        return {"shard": done}


def _score(rewards: dict[str, Any], images: list[Any], prompts: list[str] | None, batch_size: int, preprocess: str,
           device: Any) -> dict[str, list[float]]:
    """The single-process CLI's loop (``rewardkit.cli.score_images``) on decoded images."""
    import torch

    from rewardkit.image_io import to_tensor

    scores: dict[str, list[float]] = {name: [] for name in rewards}
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch, tensor = images[start : start + batch_size], None
            texts = None if prompts is None else prompts[start : start + batch_size]
            for name, reward in rewards.items():
                use = texts if reward.requires_prompt else None
                if preprocess == "exact" and hasattr(reward, "evaluate_pil"):
                    values = reward.evaluate_pil(batch, use).scores
                else:
                    tensor = to_tensor(batch).to(device or "cpu") if tensor is None else tensor
                    evaluate = getattr(reward, "evaluate", None)
                    values = evaluate(tensor, use).scores if evaluate else reward(tensor, use)
                scores[name] += values.float().cpu().tolist()
    return scores


def score_with_ray(names: Sequence[str], files: Sequence[Path], prompts: Sequence[str] | None,
                   datasets: Sequence[Path], *, shard_dir: Path, shard_size: int = DEFAULT_SHARD_SIZE,
                   batch_size: int = 16, preprocess: str = "exact", weights: dict[str, str] | None = None,
                   device: str | None = None, dtype: str | None = None, tiny_root: Path | None = None,
                   actors: int = 1, gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0,
                   address: str | None = None) -> list[dict[str, Any]]:
    """Score every shard not yet in ``shard_dir`` on Ray Data; return all rows in input order.

    Joins the running Ray (``address``, or the one this process already started) or starts a local one.
    """
    import ray

    if actors < 1 or batch_size < 1:
        raise ValueError(f"--actors and --batch-size must be at least 1, got {actors} and {batch_size}")
    shards = plan_shards(files, prompts, datasets, shard_size)
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    todo = [s for s in shards if not (shard_dir / f"{s.id}.jsonl").exists()]
    if todo:
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False, **({"include_dashboard": False} if address is None else {}))
        load = {"tiny_root": None if tiny_root is None else str(tiny_root), "device": device, "dtype": dtype,
                "weights": dict(weights or {}), "use_gpu": gpus_per_actor > 0}
        items = ray.data.from_items([{"shard": json.dumps(asdict(s))} for s in todo])
        items.map_batches(_ShardScorer, batch_size=1, concurrency=min(actors, len(todo)), num_gpus=gpus_per_actor,
                          num_cpus=cpus_per_actor, fn_constructor_args=(list(names), load, str(shard_dir), batch_size,
                                                                         preprocess)).materialize()
    rows: list[dict[str, Any]] = []
    for shard in shards:
        for line in (shard_dir / f"{shard.id}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            rows.append({**row, **{n: math.nan if row[n] is None else row[n] for n in names}})
    return rows
