"""Tests for rewardkit.weights: spec parsing, resolution (hubs faked, never the network), sha256, loading."""

from __future__ import annotations

import hashlib
import pathlib
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from rewardkit import weights as W


class _Opaque:
    """A custom class: ``torch.load(weights_only=True)`` must refuse to unpickle it."""

    def __init__(self) -> None:
        self.value = 3


@pytest.fixture(autouse=True)
def _online_env(monkeypatch: pytest.MonkeyPatch) -> list:
    """Online mode with a hub that answers: resolve_weights's bounded repo_info request is recorded."""
    import huggingface_hub

    for var in ("HF_HUB_OFFLINE", "REWARDKIT_OFFLINE", "REWARDKIT_DOWNLOAD_TIMEOUT", "REWARDKIT_DOWNLOAD_DEADLINE"):
        monkeypatch.delenv(var, raising=False)
    probes: list = []
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, *a, **k: probes.append((a, k)))
    return probes


def _recorder(calls: list, result: str):
    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return result

    return fake


def _raiser(exc: BaseException):
    def fake(*args, **kwargs):
        raise exc

    return fake


class _Net(torch.nn.Module):
    def __init__(self, hidden: int = 3) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(2, hidden)
        self.norm = torch.nn.LayerNorm(hidden)


# --- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hf:owner/repo", W.WeightSource("hf", "owner/repo", None)),
        ("hf:owner/repo/", W.WeightSource("hf", "owner/repo", None)),
        ("hf:owner/repo/model.safetensors", W.WeightSource("hf", "owner/repo", "model.safetensors")),
        ("hf:owner/repo/sub/dir/file.safetensors", W.WeightSource("hf", "owner/repo", "sub/dir/file.safetensors")),
        ("hf:owner/repo@v1.0/sub/f.bin", W.WeightSource("hf", "owner/repo", "sub/f.bin", "v1.0")),
        ("hf:owner/repo@main", W.WeightSource("hf", "owner/repo", None, "main")),
        ("ms:owner/repo", W.WeightSource("ms", "owner/repo", None)),
        ("ms:owner/repo@abc123/x/y.pth", W.WeightSource("ms", "owner/repo", "x/y.pth", "abc123")),
        ("ms:owner/repo/PickScore/", W.WeightSource("ms", "owner/repo", "PickScore/")),
        ("hf:owner/repo@v2/a/b/", W.WeightSource("hf", "owner/repo", "a/b/", "v2")),
    ],
)
def test_parse_hub_forms(spec: str, expected: W.WeightSource) -> None:
    assert W.parse_weight_spec(spec) == expected


def test_parse_local_forms(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert W.parse_weight_spec("~/w.pt") == W.WeightSource("local", str(tmp_path / "w.pt"), None)
    assert W.parse_weight_spec(tmp_path / "d") == W.WeightSource("local", str(tmp_path / "d"), None)
    assert W.parse_weight_spec("relative/hf:x").kind == "local"


@pytest.mark.parametrize("spec", ["hf:", "hf:owner", "hf:owner/", "hf:/repo", "ms:owner", "hf:owner/repo@",
                                  "hf:owner/repo@/f", "hf:owner//f", "hf:owner/repo/a//b", "hf:ow@ner/repo"])
def test_parse_malformed(spec: str) -> None:
    with pytest.raises(ValueError, match="accepted forms") as info:
        W.parse_weight_spec(spec)
    assert "hf:owner/repo" in str(info.value) and "ms:" in str(info.value)


def test_parse_wrong_type() -> None:
    with pytest.raises(TypeError, match="str or path"):
        W.parse_weight_spec(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("var", "value", "offline"), [
    ("HF_HUB_OFFLINE", "1", True), ("HF_HUB_OFFLINE", "TRUE", True), ("REWARDKIT_OFFLINE", "yes", True),
    ("REWARDKIT_OFFLINE", "On", True), ("HF_HUB_OFFLINE", "0", False), ("REWARDKIT_OFFLINE", "", False),
])
def test_is_offline(monkeypatch: pytest.MonkeyPatch, var: str, value: str, offline: bool) -> None:
    assert not W.is_offline()
    monkeypatch.setenv(var, value)
    assert W.is_offline() is offline


# --- resolution: local -----------------------------------------------------------------------------


def test_local_missing(tmp_path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="PickScore weights") as info:
        W.resolve_weights(str(missing), what="PickScore weights")
    assert str(missing) in str(info.value)


def test_local_file_and_sha256(tmp_path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"rewardkit" * 1000)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert W.resolve_weights(path, sha256=digest.upper()) == path
    assert W.resolve_weights(tmp_path) == tmp_path  # folders resolve; sha256 applies to files only
    with pytest.raises(ValueError) as info:
        W.resolve_weights(path, sha256="0" * 64)
    message = str(info.value)
    assert str(path) in message and "0" * 64 in message and digest in message
    assert "corrupt" in message and "different version" in message


def test_file_sha256_streams_and_caches(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.bin"
    data = bytes(range(256)) * 9000  # larger than one hashing chunk
    path.write_bytes(data)
    assert W.file_sha256(path) == hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(W.hashlib, "sha256", _raiser(AssertionError("cache miss")))
    assert W.file_sha256(str(path)) == hashlib.new("sha256", data).hexdigest()  # served from the cache
    monkeypatch.undo()
    path.write_bytes(data + b"x")  # size changes -> new key
    assert W.file_sha256(path) == hashlib.sha256(data + b"x").hexdigest()


# --- resolution: Hugging Face (faked) ----------------------------------------------------------------


def test_hf_file_online(monkeypatch: pytest.MonkeyPatch, tmp_path, _online_env: list) -> None:
    import huggingface_hub

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"abc")
    calls: list = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _recorder(calls, str(target)))
    out = W.resolve_weights("hf:owner/repo@v2/sub/dir/model.safetensors",
                            sha256=hashlib.sha256(b"abc").hexdigest())
    assert out == target
    assert calls == [((), {"repo_id": "owner/repo", "filename": "sub/dir/model.safetensors",
                           "revision": "v2", "local_files_only": False, "etag_timeout": 30.0})]
    assert _online_env == [(("owner/repo",), {"revision": "v2", "timeout": 30.0})]  # the bounded first request


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "REWARDKIT_OFFLINE"])
def test_hf_offline_uses_cache_only(monkeypatch: pytest.MonkeyPatch, tmp_path, var: str) -> None:
    import huggingface_hub

    monkeypatch.setenv(var, "1")
    calls: list = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _recorder(calls, str(tmp_path)))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _recorder(calls, str(tmp_path)))
    W.resolve_weights("hf:owner/repo/f.pt")
    W.resolve_weights("hf:owner/repo", allow_patterns=["*.json", "*.safetensors"])
    assert calls == [
        ((), {"repo_id": "owner/repo", "filename": "f.pt", "revision": None, "local_files_only": True,
              "etag_timeout": 30.0}),
        ((), {"repo_id": "owner/repo", "revision": None, "allow_patterns": ["*.json", "*.safetensors"],
              "local_files_only": True, "etag_timeout": 30.0}),
    ]


def test_hf_not_in_cache_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raiser(LocalEntryNotFoundError("not cached")))
    with pytest.raises(FileNotFoundError) as info:
        W.resolve_weights("hf:owner/repo/model.safetensors", what="HPS weights")
    message = str(info.value)
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)
    for part in ("HPS weights", "hf:owner/repo/model.safetensors", "offline", "HF_HUB_OFFLINE",
                 "hf download owner/repo model.safetensors", "weights=", "unset"):
        assert part in message


def test_hf_repo_and_entry_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    repo_error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its __init__ needs an HTTP response
    Exception.__init__(repo_error, "404")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raiser(repo_error))
    with pytest.raises(FileNotFoundError, match="does not exist or is private") as info:
        W.resolve_weights("hf:owner/missing")
    assert "offline" not in str(info.value)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raiser(EntryNotFoundError("no file")))
    with pytest.raises(FileNotFoundError, match="file does not exist in the repo"):
        W.resolve_weights("hf:owner/repo/missing.bin")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raiser(ConnectionError("boom")))
    with pytest.raises(RuntimeError, match="could not be downloaded"):
        W.resolve_weights("hf:owner/repo/x.bin")


# --- resolution: ModelScope (fake module) ------------------------------------------------------------


def _fake_modelscope(monkeypatch: pytest.MonkeyPatch, calls: list, result: str) -> types.ModuleType:
    module = types.ModuleType("modelscope")

    def model_file_download(model_id, file_path, revision=None, *, local_files_only=False):
        calls.append(("file", model_id, file_path, revision, local_files_only))
        return result

    def snapshot_download(model_id, revision=None, *, allow_patterns=None, local_files_only=False):
        calls.append(("snapshot", model_id, revision, allow_patterns, local_files_only))
        return result

    module.model_file_download = model_file_download
    module.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "modelscope", module)
    return module


def test_ms_online_and_offline(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    calls: list = []
    _fake_modelscope(monkeypatch, calls, str(tmp_path))
    assert W.resolve_weights("ms:owner/repo@v1/sub/w.safetensors") == tmp_path
    W.resolve_weights("ms:owner/repo", allow_patterns=["*.bin"])
    monkeypatch.setenv("REWARDKIT_OFFLINE", "1")
    W.resolve_weights("ms:owner/repo/w.bin")
    W.resolve_weights("ms:owner/repo")
    assert calls == [
        ("file", "owner/repo", "sub/w.safetensors", "v1", False),
        ("snapshot", "owner/repo", None, ["*.bin"], False),
        ("file", "owner/repo", "w.bin", None, True),
        ("snapshot", "owner/repo", None, None, True),
    ]


def test_ms_offline_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _fake_modelscope(monkeypatch, [], "")
    module.model_file_download = _raiser(ValueError("Cannot find the requested file in the local cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    with pytest.raises(FileNotFoundError) as info:
        W.resolve_weights("ms:owner/repo/w.bin", what="ImageReward weights")
    message = str(info.value)
    for part in ("ImageReward weights", "ModelScope downloads are disabled", "HF_HUB_OFFLINE", "local cache",
                 "modelscope download --model owner/repo w.bin"):
        assert part in message


def test_ms_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(ImportError, match=r"rewardkit\[modelscope\]"):
        W.resolve_weights("ms:owner/repo")


# --- reading ------------------------------------------------------------------------------------------


def _state() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.randn(3, 2), "a.bias": torch.arange(3.0)}


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)  # safetensors stores keys sorted
    for key in want:
        assert torch.equal(got[key], want[key])


def test_read_safetensors_and_pth(tmp_path) -> None:
    state = _state()
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    _assert_same(W.read_state_dict(tmp_path / "w.safetensors"), state)
    _assert_same(W.read_state_dict(str(tmp_path / "w.pth")), state)


def test_read_wrapped(tmp_path) -> None:
    state = _state()
    path = tmp_path / "ckpt.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    _assert_same(W.read_state_dict(path, unwrap=("model", "state_dict")), state)
    with pytest.raises(ValueError, match="not a flat state dict") as info:
        W.read_state_dict(path)
    assert "'state_dict'" in str(info.value) and str(path) in str(info.value)


def test_read_not_a_state_dict(tmp_path) -> None:
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list"):
        W.read_state_dict(tmp_path / "list.pt")


@pytest.mark.parametrize("name", ["w.safetensors", "w.pth"])
def test_read_truncated(tmp_path, name: str) -> None:
    path = tmp_path / name
    (save_file(_state(), path) if name.endswith("safetensors") else torch.save(_state(), path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read checkpoint") as info:
        W.read_state_dict(path)
    assert str(path) in str(info.value) and info.value.__cause__ is not None


def test_read_refuses_custom_pickle(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "obj": _Opaque()}, path)
    with pytest.raises(ValueError, match="objects other than tensors") as info:
        W.read_state_dict(path)
    assert str(path) in str(info.value)


def test_read_folder_missing_and_suffix(tmp_path) -> None:
    save_file(_state(), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        W.read_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError):
        W.read_state_dict(tmp_path / "absent.pt")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown checkpoint suffix"):
        W.read_state_dict(tmp_path / "w.npz")


# --- strict loading -----------------------------------------------------------------------------------


def test_load_strict_success_casts_dtype() -> None:
    net = _Net()
    state = {k: torch.randn_like(v, dtype=torch.float64) for k, v in _Net().state_dict().items()}
    W.load_state_dict_strict(net, state, name="toy")
    assert net.proj.weight.dtype == torch.float32
    assert torch.allclose(net.proj.weight, state["proj.weight"].float())


def test_load_strict_missing_and_unexpected() -> None:
    state = _Net().state_dict()
    state.pop("norm.bias")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(W.CheckpointMismatchError) as info:
        W.load_state_dict_strict(_Net(), state, name="toy", hint="is this a PickScore checkpoint?")
    message = str(info.value)
    assert message.startswith("toy: checkpoint does not match the model: 1 missing keys [norm.bias], "
                              "1 unexpected keys [extra.weight], 0 shape conflicts")
    assert message.endswith("is this a PickScore checkpoint?") and "config=" not in message
    assert info.value.missing == ["norm.bias"] and info.value.unexpected == ["extra.weight"]
    assert isinstance(info.value, ValueError)


def test_load_strict_shape_conflict() -> None:
    with pytest.raises(W.CheckpointMismatchError) as info:
        W.load_state_dict_strict(_Net(hidden=3), _Net(hidden=5).state_dict(), name="toy")
    message = str(info.value)
    assert "proj.weight: checkpoint (5, 2) vs model (3, 2)" in message and "norm.bias" in message
    assert "4 shape conflicts" in message and "pass config=... to rk.load" in message


def test_load_strict_lists_at_most_ten() -> None:
    state = dict(_Net().state_dict(), **{f"junk{i}": torch.zeros(1) for i in range(12)})
    with pytest.raises(W.CheckpointMismatchError, match=r"12 unexpected keys \[junk0, .*junk9, \.\.\. \(2 more\)\]"):
        W.load_state_dict_strict(_Net(), state, name="toy")


def test_load_strict_key_map() -> None:
    source = _Net()
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    target = _Net()
    W.load_state_dict_strict(target, wrapped, name="toy", key_map=lambda sd: W.strip_prefixes(sd, ["module."]))
    assert torch.equal(target.proj.weight, source.proj.weight)
    assert "module.proj.weight" in wrapped  # the input is not modified


# --- converters ---------------------------------------------------------------------------------------


def test_rename_prefixes_first_match_wins() -> None:
    state = {"vision.a": 1, "vision_model.b": 2, "text.c": 3, "other": 4}
    out = W.rename_prefixes(state, [("vision.", "visual."), ("vision", "V"), ("text.", "")])
    assert out == {"visual.a": 1, "V_model.b": 2, "c": 3, "other": 4}
    with pytest.raises(ValueError, match="two keys"):
        W.rename_prefixes({"a.x": 1, "b.x": 2}, [("a.", ""), ("b.", "")])


def test_strip_prefixes_in_order_once_each() -> None:
    out = W.strip_prefixes({"module.model.w": 1, "model.module.v": 2, "module.module.u": 3}, ["module.", "model."])
    assert out == {"w": 1, "module.v": 2, "module.u": 3}


def test_drop_keys() -> None:
    state = {"a": 1, "b": 2, "logit_scale": 3}
    assert W.drop_keys(state, ["a", "zzz"]) == {"b": 2, "logit_scale": 3}
    assert W.drop_keys(state, "logit_scale") == {"a": 1, "b": 2}
    assert W.drop_keys(state, lambda k: k.startswith("logit")) == {"a": 1, "b": 2}


def test_hub_sub_folder_downloads_only_that_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import huggingface_hub

    calls: list = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _recorder(calls, str(tmp_path)))
    path = W.resolve_weights("hf:owner/repo/PickScore/", allow_patterns=["*.json", "*.txt"])
    assert path == tmp_path / "PickScore"
    assert calls[0][1]["allow_patterns"] == ["PickScore/*.json", "PickScore/*.txt"]
    ms_calls: list = []
    _fake_modelscope(monkeypatch, ms_calls, str(tmp_path))
    assert W.resolve_weights("ms:owner/repo/a/b/") == tmp_path / "a" / "b"
    assert ms_calls == [("snapshot", "owner/repo", None, ["a/b/*"], False)]


def test_url_uses_torch_hub_checkpoint_cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cached = tmp_path / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir()
    cached.write_bytes(b"x")
    url = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
    assert W.parse_weight_spec(url) == W.WeightSource("url", url, None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert W.resolve_weights(url) == cached  # offline but cached: no download


def test_url_offline_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("REWARDKIT_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="offline mode is on.*download it there first"):
        W.resolve_weights("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", what="LPIPS trunk")


def test_url_online_downloads_with_hash_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A real HTTP download from a loopback server: streamed into torch.hub's cache once, its sha256 prefix
    (torch.hub's "name-<hex>.ext" convention) checked, a mismatch refused without leaving a file."""
    import http.server
    import threading

    payload = b"weights" * 1000
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    base = f"http://127.0.0.1:{server.server_address[1]}/models"
    try:
        path = W.resolve_weights(f"{base}/vgg16-{prefix}.pth")
        assert path == tmp_path / "checkpoints" / f"vgg16-{prefix}.pth" and path.read_bytes() == payload
        W.resolve_weights(f"{base}/vgg16-{prefix}.pth")
        assert requests == [f"/models/vgg16-{prefix}.pth"], "a cached file must not be downloaded again"
        with pytest.raises(ValueError, match="sha256 .* not the 0badc0de"):
            W.resolve_weights(f"{base}/other-0badc0de.pth")
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"vgg16-{prefix}.pth"]


def test_hf_unreachable_uses_the_cached_copy(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The bounded first request fails (no answer): a cached file is used with a warning, as huggingface_hub
    itself does; a missing one is a DownloadTimeoutError."""
    import huggingface_hub

    def no_answer(self, *args, **kwargs):
        raise TimeoutError("timed out")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", no_answer)
    calls: list = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _recorder(calls, str(tmp_path)))
    with pytest.warns(UserWarning, match="could not be reached .* using the cached copy"):
        assert W.resolve_weights("hf:owner/repo/f.bin") == tmp_path
    assert [kwargs["local_files_only"] for _, kwargs in calls] == [True]
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raiser(LocalEntryNotFoundError("not cached")))
    with pytest.raises(W.DownloadTimeoutError, match=r"resolve/main/f.bin did not answer within 30 s"):
        W.resolve_weights("hf:owner/repo/f.bin")


def test_hf_offline_since_import_is_a_cache_miss_not_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE when imported: unset later, its first request refuses; a file not in
    the cache is then reported as a cache miss (with the fix), not as a server that did not answer."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    def refused(self, *args, **kwargs):
        raise OfflineModeIsEnabled("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", refused)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raiser(LocalEntryNotFoundError("not cached")))
    with pytest.raises(FileNotFoundError, match="is not in the local Hugging Face cache; fix: download it first"):
        W.resolve_weights("hf:owner/repo/f.bin")
