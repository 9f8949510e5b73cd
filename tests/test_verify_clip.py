"""``rewardkit verify`` for pickscore, clip-score, hpsv2 / hpsv2.1, bioclip and imagereward.

Tiny seeded checkpoints in each reward's real format stand in for the downloads (the checks read them through
the same resolver); the upstream side is the upstream code itself (transformers + the PickScore formula,
torchmetrics ``clip_score``, the ``hpsv2`` package's vendored open_clip, open_clip ``local-dir:``, the
``image-reward`` package). One check downloads its checkpoint from an ``http.server`` on 127.0.0.1. Offline, every
check says why it could not run; a difference beyond the tolerance fails the command.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

import rewardkit.testing as rkt
from rewardkit.cli import main
from rewardkit.verify import run_verify

NEW_CHECKS = ("pickscore", "clip-score", "hpsv2", "bioclip", "imagereward")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, dict[str, str]]:
    """``--set`` options per check, pointing at tiny checkpoints."""
    root = tmp_path_factory.mktemp("rk-verify-clip")
    hps = rkt.tiny_hpsv2(root / "hps")
    hps_config = root / "hps" / "open_clip_config.json"
    hps_config.write_text(json.dumps(hps["config"]))
    imagereward = rkt.tiny_imagereward(root / "imagereward")
    ir_config = root / "imagereward" / "config.json"
    ir_config.write_text(json.dumps(imagereward["config"]))
    return {
        "pickscore": {"weights": rkt.tiny_pickscore(root)["weights"]},
        "clip-score": {"weights": rkt.tiny_clip_score(root)["weights"]},
        "hpsv2": {"weights": hps["weights"], "config": str(hps_config)},
        "bioclip": {"weights": rkt.tiny_bioclip(root)["weights"]},
        "imagereward": {"weights": imagereward["weights"], "tokenizer": imagereward["tokenizer"],
                        "config": str(ir_config)},
    }


def _set_flags(options: dict[str, dict[str, str]]) -> list[str]:
    return [flag for name, keys in options.items() for key, value in keys.items()
            for flag in ("--set", f"{name}.{key}={value}")]


def test_every_new_check_passes_against_its_upstream_through_the_cli(tiny, capsys, tmp_path):
    out = tmp_path / "verify.json"
    assert main(["verify", *NEW_CHECKS, *_set_flags(tiny), "--out", str(out)]) == 0
    rows = {row["reward"]: row for row in json.loads(out.read_text())}
    assert set(rows) == set(NEW_CHECKS)
    for name, row in rows.items():
        assert row["passed"] is True and 0 <= row["max_abs_diff"] <= row["tolerance"], row
    assert rows["pickscore"]["upstream"].startswith("transformers")
    assert rows["clip-score"]["upstream"].startswith("torchmetrics")
    assert rows["hpsv2"]["upstream"].startswith("hpsv2 1.2.0")
    assert rows["bioclip"]["upstream"].startswith("open_clip_torch")
    assert rows["imagereward"]["upstream"].startswith("image-reward 1.5")
    assert "| imagereward | image-reward 1.5 ImageReward.score |" in capsys.readouterr().out


def test_hpsv21_downloads_its_checkpoint_from_a_loopback_server(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("REWARDKIT_OFFLINE", raising=False)  # conftest's guard still refuses non-loopback sockets
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    served = tmp_path / "served"
    served.mkdir()
    shutil.copyfile(tiny["hpsv2"]["weights"], served / "HPS_v2.1_compressed.pt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/HPS_v2.1_compressed.pt"
        (check,) = run_verify(["hpsv2.1"], {"hpsv2.1": {"weights": url, "config": tiny["hpsv2"]["config"]}})
    finally:
        server.shutdown()
        server.server_close()
    assert check.passed is True and check.reward == "hpsv2.1", check
    assert list((tmp_path / "hub").rglob("HPS_v2.1_compressed.pt"))  # it came through the download path


def test_offline_every_new_check_says_why_it_did_not_run(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("REWARDKIT_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    checks = run_verify([*NEW_CHECKS, "hpsv2.1"])
    assert [c.passed for c in checks] == [None] * 6
    notes = {c.reward: c.note for c in checks}
    assert all(note.startswith("not checked: ") for note in notes.values())
    assert "PickScore_v1" in notes["pickscore"] and "clip-vit-large-patch14" in notes["clip-score"]
    assert "HPS_v2_compressed.pt" in notes["hpsv2"] and "HPS_v2.1_compressed.pt" in notes["hpsv2.1"]
    assert "bioclip-2" in notes["bioclip"] and "ImageReward.pt" in notes["imagereward"]


def test_a_missing_upstream_package_is_named_with_its_install_command(tiny, monkeypatch):
    import importlib.metadata

    real_version = importlib.metadata.version

    def version(package: str) -> str:
        if package in ("image-reward", "hpsv2"):
            raise importlib.metadata.PackageNotFoundError(package)
        return real_version(package)

    monkeypatch.setattr(importlib.metadata, "version", version)
    imagereward, hps = run_verify(["imagereward", "hpsv2"], tiny)
    assert imagereward.passed is None and "pip install --no-deps image-reward==1.5" in imagereward.note
    assert hps.passed is None and "pip install --no-deps hpsv2==1.2.0" in hps.note


def test_a_difference_beyond_the_tolerance_fails_the_command(tiny, capsys, monkeypatch):
    from rewardkit.rewards.pickscore import PickScoreReward

    exact = PickScoreReward.score_pil
    monkeypatch.setattr(PickScoreReward, "score_pil", lambda self, *args, **kw: exact(self, *args, **kw) + 2e-3)
    assert main(["verify", "pickscore", *_set_flags({"pickscore": tiny["pickscore"]})]) != 0
    captured = capsys.readouterr()
    assert "| pickscore |" in captured.out and "| NO |" in captured.out
    assert "pickscore differ from upstream beyond the tolerance" in captured.err


def test_the_vendored_hpsv2_import_leaves_no_trace():
    import sys

    from rewardkit.verify_clip import hpsv2_open_clip

    before = {name for name in sys.modules if name.startswith(("hpsv2", "clint"))}
    with hpsv2_open_clip() as vendored:
        assert callable(vendored.create_model_and_transforms)
    assert {name for name in sys.modules if name.startswith(("hpsv2", "clint"))} == before
