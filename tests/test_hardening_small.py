"""Small hardening fixes (issue 13): HPS at extreme aspect ratios, tiny builders that are byte-identical
across processes, and the tiny causal LM written on every rank of a distributed run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def test_hps_scores_extreme_aspect_ratios_on_both_paths(tiny_reward) -> None:
    """2000x3 and 3x2000 images: the letterbox keeps a 1-px line (upstream's resize would raise on 0 px),
    and the tensor path and the exact PIL path give the same finite scores."""
    reward = tiny_reward("hpsv2")
    rng = np.random.default_rng(0)
    for height, width in ((3, 2000), (2000, 3)):
        pixels = (rng.random((2, height, width, 3)) * 255).astype(np.uint8)
        tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        scores = reward(tensor, ["a line", "a thin line"])
        assert scores.shape == (2,) and torch.isfinite(scores).all()
        exact = reward.score_pil([Image.fromarray(p) for p in pixels], ["a line", "a thin line"])
        torch.testing.assert_close(exact, scores, rtol=1e-5, atol=1e-6)


_BUILD = """
import hashlib, sys
from pathlib import Path
import torch
import rewardkit.testing as rkt
torch.set_num_threads(2)  # another thread count than the test process's: the bytes must not depend on it
path = Path(rkt.tiny_fid_inception(sys.argv[1])["weights"])
print(hashlib.sha256(path.read_bytes()).hexdigest())
"""


def test_tiny_fid_checkpoint_is_byte_identical_across_processes(tiny_root: Path, tmp_path: Path) -> None:
    """Statistics record the weights' sha256, so a tiny checkpoint built in another process (another pid in
    the temporary name torch.save used to write into the archive; another intra-op thread count in the
    calibration's reductions) must have the same bytes. The session's checkpoint (built here, or already by
    another test) is compared with one built in a fresh process."""
    import rewardkit.testing as rkt

    run = subprocess.Popen([sys.executable, "-c", _BUILD, str(tmp_path / "other")], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = Path(rkt.tiny_fid_inception(tiny_root / "upstream" / "fid")["weights"])  # load_tiny's folder
    finally:
        torch.set_num_threads(threads)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-2000:]
    assert out.strip().splitlines()[-1] == hashlib.sha256(here.read_bytes()).hexdigest()


_RANK_WORKER = """
import json, os, sys
from pathlib import Path
import torch.distributed as dist
dist.init_process_group("gloo")
from rewardkit.testing.language import tiny_causal_lm
rank = dist.get_rank()
folder = tiny_causal_lm(Path(sys.argv[1]) / f"rank{rank}")
Path(f"{sys.argv[1]}/files.{rank}").write_text(json.dumps(sorted(p.name for p in folder.iterdir())))
dist.barrier()
dist.destroy_process_group()
"""


def test_tiny_causal_lm_writes_its_folder_on_every_rank(tmp_path: Path) -> None:
    """transformers 5's save_pretrained writes nothing on ranks > 0 once torch.distributed is initialised;
    every rank of a 2-process gloo run must still get a loadable folder."""
    worker = tmp_path / "worker.py"
    worker.write_text(_RANK_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29647",
               str(worker), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    files = [json.loads((tmp_path / f"files.{rank}").read_text()) for rank in (0, 1)]
    assert files[0] == files[1]
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(files[1])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rank1" / "tiny-causal-lm", local_files_only=True)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "rank0" / "tiny-causal-lm", local_files_only=True)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    digest = [hashlib.sha256((tmp_path / f"rank{r}" / "tiny-causal-lm" / "model.safetensors").read_bytes()).hexdigest()
              for r in (0, 1)]
    assert digest[0] == digest[1]
