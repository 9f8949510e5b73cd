"""``rewardkit score --engine ray`` (Ray Data): the same rows as the single-process CLI, Parquet and WebDataset
shards, and resumption (finished shards are skipped). One local Ray for the module, shut down at the end."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rewardkit.cli import main
from rewardkit.serve.dataset import plan_shards, read_shard

NAMES = ["pickscore", "jpeg-compressibility"]
SIZES = [(32, 32), (40, 24), (24, 40), (32, 32), (48, 32), (32, 48), (24, 24), (40, 40), (32, 24), (24, 32)]


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _png(index: int, size: tuple[int, int]) -> bytes:
    image = Image.new("RGB", size, (20 * index % 256, 90, 255 - 20 * index))
    image.paste((240, 200, 10), (2, 2, size[0] // 2, size[1] // 3 + index))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dataset")
    folder = root / "images"
    folder.mkdir()
    pngs = [_png(i, size) for i, size in enumerate(SIZES)]
    prompts = [f"a picture number {i}" for i in range(len(pngs))]
    for i, data in enumerate(pngs):
        (folder / f"{i:02d}.png").write_bytes(data)
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    table = pa.table({"key": [f"{i:02d}" for i in range(len(pngs))], "prompt": prompts,
                      "image": [{"bytes": d, "path": None} for d in pngs]})  # HF datasets' Image() layout
    pq.write_table(table, root / "part-0.parquet")
    with tarfile.open(root / "shard-000.tar", "w") as archive:
        for i, (data, prompt) in enumerate(zip(pngs, prompts)):
            for name, payload in ((f"{i:02d}.png", data), (f"{i:02d}.txt", prompt.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return {"root": root, "folder": folder, "prompts": root / "prompts.txt", "parquet": root / "part-0.parquet",
            "tar": root / "shard-000.tar"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_rows(got: list[dict], want: list[dict]) -> None:
    """Same rows, keys and order; scores equal up to float32 rounding (a Ray actor may run torch on another
    number of threads than this process; the outputs were byte-identical on the 2-core runner)."""
    assert [list(r) for r in got] == [list(r) for r in want]
    assert [(r["image"], r["prompt"]) for r in got] == [(r["image"], r["prompt"]) for r in want]
    for row, expected in zip(got, want):
        for name in NAMES:
            assert math.isclose(row[name], expected[name], rel_tol=1e-6, abs_tol=1e-7), (row, expected)


def test_shard_readers_agree_with_the_folder(inputs) -> None:
    files = sorted(inputs["folder"].iterdir())
    shards = plan_shards(files, None, [inputs["parquet"], inputs["tar"]], shard_size=4)
    assert [s.kind for s in shards] == ["files"] * 3 + ["parquet", "webdataset"]
    folder_images = [image for shard in shards[:3] for image in read_shard(shard)[1]]
    for shard in shards[3:]:
        keys, images, prompts = read_shard(shard)
        assert keys[0].endswith("#00") and prompts[3] == "a picture number 3"
        assert [im.tobytes() for im in images] == [im.tobytes() for im in folder_images]
    assert plan_shards(files, None, [], 4)[0].id == shards[0].id  # ids are stable: resumption finds them


def test_ray_engine_writes_the_local_rows_and_resumes(ray_instance, inputs, tmp_path: Path) -> None:
    common = ["score", *NAMES, "--prompts", str(inputs["prompts"]), "--tiny", "--batch-size", "4"]
    local_out, ray_out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert main([*common, "--images", str(inputs["folder"]), "--out", str(local_out)]) == 0
    ray_args = [*common, "--images", str(inputs["folder"]), "--engine", "ray", "--shard-size", "4"]
    assert main([*ray_args, "--out", str(ray_out)]) == 0
    _assert_same_rows(_rows(ray_out), _rows(local_out))
    shard_dir = tmp_path / "ray.jsonl.shards"
    shard_files = sorted(shard_dir.glob("files-*.jsonl"))
    assert len(shard_files) == 3
    shard_files[1].unlink()  # as if the run had been killed before this shard finished
    before = {p: p.stat().st_mtime_ns for p in (shard_files[0], shard_files[2])}
    assert main([*ray_args, "--out", str(ray_out)]) == 0
    _assert_same_rows(_rows(ray_out), _rows(local_out))
    assert shard_files[1].exists()
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished shards were skipped


def test_ray_engine_parquet_and_webdataset_shards(ray_instance, inputs, tmp_path: Path) -> None:
    local_out, ray_out = tmp_path / "local.jsonl", tmp_path / "ray.csv"
    assert main(["score", *NAMES, "--images", str(inputs["folder"]), "--prompts", str(inputs["prompts"]), "--tiny",
                 "--out", str(local_out)]) == 0
    assert main(["score", *NAMES, "--images", str(inputs["parquet"]), str(inputs["tar"]), "--tiny", "--engine", "ray",
                 "--actors", "2", "--out", str(tmp_path / "ray.jsonl")]) == 0
    local, served = _rows(local_out), _rows(tmp_path / "ray.jsonl")
    assert len(served) == 2 * len(local)
    for index, row in enumerate(served):
        want = local[index % len(local)]
        source = inputs["parquet"] if index < len(local) else inputs["tar"]
        assert row["image"] == f"{source}#{index % len(local):02d}" and row["prompt"] == want["prompt"]
        for name in NAMES:
            assert math.isclose(row[name], want[name], rel_tol=1e-5, abs_tol=1e-6)
    assert main(["score", *NAMES, "--images", str(inputs["parquet"]), "--prompt", "x", "--tiny", "--engine", "ray",
                 "--out", str(ray_out)]) == 2  # shards carry their own prompts
