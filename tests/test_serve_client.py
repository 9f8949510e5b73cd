"""The remote-reward client and the wire formats, against loopback WSGI servers (no Ray; see test_serve_ray.py).

The servers here run ``rewardkit.serve.wsgi`` (the same scoring core as the Ray deployment) or, for the
field's protocol, a stand-in written from yifan123/reward-server ``app_geneval.py`` (pickled dict with JPEG
``images``, ``meta_datas``, ``only_strict`` in; pickled dict with ``scores`` out).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

import rewardkit as rk
from rewardkit.cli import main
from rewardkit.serve.client import RemoteReward
from rewardkit.serve.core import ScoringCore
from rewardkit.serve.wire import Batch, WireError, decode_pickle_request, decode_request, encode_request
from rewardkit.serve.wsgi import make_wsgi_app, start_wsgi_server
from rewardkit.testing import random_images

JPEG = "jpeg-compressibility"


@pytest.fixture(scope="module")
def pickscore(tiny_reward):
    return tiny_reward("pickscore")


class _Server:
    """A loopback WSGI server that counts requests and can be slowed down or made to fail."""

    def __init__(self, reward, allow_pickle: bool = False, delay: float = 0.0) -> None:
        self.app, self.delay, self.count, self.fail = make_wsgi_app(ScoringCore(reward), allow_pickle), delay, 0, 0
        self.lock = threading.Lock()
        self.server, self.url = start_wsgi_server(self._wrapped)

    def _wrapped(self, environ, start_response):
        with self.lock:
            self.count += 1
            fail, self.fail = self.fail > 0, max(0, self.fail - 1)
        if fail:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"busy"]
        time.sleep(self.delay)
        return self.app(environ, start_response)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def servers():
    made: list[_Server] = []

    def make(reward, **kwargs) -> _Server:
        made.append(_Server(reward, **kwargs))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_safetensors_scores_equal_in_process_and_compose(pickscore, servers) -> None:
    server = servers(pickscore)
    images, prompts = random_images(5, 40, 48, seed=1), [f"a photo of {i} cats" for i in range(5)]
    remote = rk.load("pickscore", server=server.url, batch_size=2)
    assert isinstance(remote, RemoteReward) and remote.name == "pickscore" and not remote.differentiable
    out = remote.evaluate(images, prompts)
    expected = pickscore(images, prompts)
    assert out.scores.dtype == torch.float32 and out.details["failure"] == [None] * 5
    torch.testing.assert_close(out.scores, expected, rtol=1e-5, atol=1e-5)
    assert server.count == 3  # 5 rows in requests of 2
    total = rk.compose({remote: 1.0, "rewardkit.testing.toy_rewards:load_brightness": 2.0})
    torch.testing.assert_close(total(images, prompts), expected + 2 * images.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    restored = pickle.loads(pickle.dumps(remote))  # picklable (trainers ship rewards to workers)
    torch.testing.assert_close(restored(images, prompts), expected, rtol=1e-5, atol=1e-5)


def test_json_png_format_equals_scoring_the_8bit_images(pickscore, servers) -> None:
    server = servers(pickscore)
    images = random_images(3, 32, 32, seed=2)
    quantized = (images * 255).round() / 255
    remote = rk.load("pickscore", server=server.url, protocol="json")
    torch.testing.assert_close(remote(images, "a dog"), pickscore(quantized, "a dog"), rtol=1e-5, atol=1e-5)


def test_wire_roundtrip_carries_prompts_context_and_mixed_sizes() -> None:
    images = random_images(2, 16, 24, seed=3)
    body, kind = encode_request(images, ["a", "b"], {"metadata": [{"tag": "x"}, None]})
    batch = decode_request(body, kind)
    assert batch.prompts == ["a", "b"] and batch.context == {"metadata": [{"tag": "x"}, None]}
    assert torch.equal(torch.stack(batch.images), images)  # safetensors: exact float32
    with pytest.raises(WireError, match="Content-Type"):
        decode_request(body, "text/plain")
    from safetensors.torch import save

    with pytest.raises(WireError, match=r"\[0, 1\]"):  # checked at the door (HTTP 400), not in the model
        decode_request(save({"images": images * 2}), kind)
    as_json, json_kind = encode_request(images, ["a", "b"], fmt="json")
    assert decode_request(as_json, json_kind).prompts == ["a", "b"]
    with pytest.raises(WireError, match="prompts"):
        decode_request(as_json.replace(b'"b"]', b'"b", "c"]'), json_kind)
    brightness = rk.load("rewardkit.testing.toy_rewards:load_brightness")
    small, large = random_images(1, 8, 8, seed=9)[0], images[1]
    merged = ScoringCore(brightness).score([Batch([small, large]), Batch([large])])  # one pass per image size
    assert merged[0].scores == pytest.approx([small.mean().item(), large.mean().item()])
    assert merged[1].scores == pytest.approx([large.mean().item()])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encode_request(images * 2)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        encode_request(images, None, {"metadata": object()})
    with pytest.raises(TypeError, match=r"\(B, 3, H, W\)"):
        encode_request(images[0])


def test_pickle_reader_refuses_arbitrary_globals() -> None:
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(WireError, match="not allowed"):
        decode_pickle_request(pickle.dumps({"images": [], "exploit": Exploit()}))
    import numpy as np  # upstream clients pickle np.array_split pieces: numpy arrays of str are allowed
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(jpeg, format="JPEG")
    batch = decode_pickle_request(pickle.dumps({"images": [jpeg.getvalue()], "prompts": np.array(["a cat"])}))
    assert batch.prompts == ["a cat"] and batch.images[0].shape == (3, 8, 8)


def test_pickle_route_is_off_unless_enabled(servers) -> None:
    server = servers(rk.load(JPEG))
    request = urllib.request.Request(server.url + "/", data=pickle.dumps({"images": []}), method="POST")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code == 404
    assert urllib.request.urlopen(server.url + "/health", timeout=10).read() == b"ok"
    assert b'"name": "jpeg-compressibility"' in urllib.request.urlopen(server.url + "/ready", timeout=10).read()


def test_upstream_style_pickle_client_against_rewardkit_server(servers) -> None:
    """A client written like flow_grpo's ``deqa_score_remote`` (JPEG bytes, pickle, read ``outputs``)."""
    local = rk.load(JPEG)
    server = servers(local, allow_pickle=True)
    images = random_images(3, 32, 32, seed=4)
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    jpegs = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG")
        jpegs.append(buffer.getvalue())
    request = urllib.request.Request(server.url, data=pickle.dumps({"images": jpegs}), method="POST")
    answer = pickle.loads(urllib.request.urlopen(request, timeout=30).read())
    decoded = torch.stack([torch.from_numpy(__import__("numpy").array(Image.open(io.BytesIO(j)).convert("RGB")))
                           for j in jpegs]).permute(0, 3, 1, 2).float() / 255
    assert answer["outputs"] == answer["scores"] == pytest.approx(local(decoded).tolist())
    remote = rk.load(JPEG, server=server.url, protocol="reward-server")
    assert remote(images).tolist() == pytest.approx(local(decoded).tolist())


def test_verl_omni_style_pickle_client(pickscore, servers) -> None:
    """The body verl-omni's ``http_scorer_client.compute_score`` posts: one JPEG, its prompt, ``metadata: {}``."""
    server = servers(pickscore, allow_pickle=True)
    image = random_images(1, 32, 32, seed=8)
    buffer = io.BytesIO()
    Image.fromarray((image[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(buffer, format="JPEG")
    body = pickle.dumps({"images": [buffer.getvalue()], "prompts": ["a red cube"], "metadata": {}})
    answer = pickle.loads(urllib.request.urlopen(urllib.request.Request(server.url, data=body), timeout=30).read())
    decoded = torch.from_numpy(__import__("numpy").array(Image.open(buffer))).permute(2, 0, 1)[None].float() / 255
    assert "error" not in answer and answer["scores"] == pytest.approx(pickscore(decoded, "a red cube").tolist(),
                                                                        rel=1e-5, abs=1e-5)


def _geneval_stand_in(environ, start_response):
    """app_geneval.py's contract with a stand-in score: the fraction of included objects whose count is 1,
    halved unless ``only_strict``; answers the five keys flow_grpo's ``geneval_score`` reads."""
    data = pickle.loads(environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"])))
    images = [Image.open(io.BytesIO(d), formats=["jpeg"]) for d in data["images"]]
    scores = [sum(i["count"] == 1 for i in m["include"]) / len(m["include"]) * (1 if data["only_strict"] else 0.5)
              for m in data["meta_datas"]]
    assert len(images) == len(scores)
    body = pickle.dumps({"scores": scores, "rewards": scores, "strict_rewards": scores, "group_rewards": {},
                         "group_strict_rewards": {}})
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [body]


def test_geneval_against_a_reward_server_style_endpoint() -> None:
    server, url = start_wsgi_server(_geneval_stand_in)
    try:
        metadata = [{"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 2}]},
                    {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}]
        remote = rk.load("geneval", server=url, protocol="reward-server", only_strict=True, batch_size=1)
        assert not remote.requires_prompt
        assert remote(random_images(2, 32, 32), metadata=metadata).tolist() == [0.5, 1.0]
    finally:
        server.shutdown()
        server.server_close()


def test_failures_are_nan_rows_with_reasons(pickscore, servers) -> None:
    images = random_images(3, 32, 32, seed=5)
    dead = rk.load("pickscore", server="http://127.0.0.1:9", retries=1, backoff=0.0)
    out = dead.evaluate(images, "a cat")
    assert torch.isnan(out.scores).all() and all("connection error" in f for f in out.details["failure"])
    server = servers(pickscore)
    server.fail = 2  # two 503s, then answers: retried, every row scored
    out = rk.load("pickscore", server=server.url, retries=2, backoff=0.0).evaluate(images, "a cat")
    assert torch.isfinite(out.scores).all() and server.count == 3
    slow = servers(pickscore, delay=3.0)
    out = rk.load("pickscore", server=slow.url, timeout=0.5, retries=0).evaluate(images, "a cat")
    assert torch.isnan(out.scores).all() and all(f.startswith("timeout") for f in out.details["failure"])
    out = rk.load("pickscore", server=slow.url, batch_timeout=0.5, batch_size=1).evaluate(images, "a cat")
    assert torch.isnan(out.scores).all() and all("deadline" in f for f in out.details["failure"])


def test_bad_input_and_options_raise_before_any_request(servers) -> None:
    server = servers(rk.load(JPEG))
    with pytest.raises(ValueError, match="http"):
        rk.load(JPEG, server="127.0.0.1:8000")
    with pytest.raises(ValueError, match="protocol"):
        rk.load(JPEG, server=server.url, protocol="grpc")
    with pytest.raises(ValueError, match="weights"):
        rk.load(JPEG, server=server.url, weights="x.pt")
    with pytest.raises(ValueError, match="distribution"):
        rk.load("fid", server=server.url)
    remote = rk.load("pickscore", server=server.url)
    with pytest.raises(ValueError, match="prompt"):
        remote(random_images(2, 16, 16))
    assert server.count == 0


def test_several_urls_spread_fail_over_and_rank(pickscore, servers) -> None:
    a, b = servers(pickscore), servers(pickscore)
    images, prompts = random_images(8, 32, 32, seed=6), "a red cube"
    expected = pickscore(images, prompts)
    remote = rk.load("pickscore", server=[a.url, b.url], batch_size=1, max_concurrency=4)
    torch.testing.assert_close(remote(images, prompts), expected, rtol=1e-5, atol=1e-5)
    assert a.count > 0 and b.count > 0 and a.count + b.count == 8  # least-loaded uses both
    ranked = rk.load("pickscore", server=[a.url, b.url], batch_size=1, max_concurrency=1, balance="rank", rank=3)
    before = (a.count, b.count)
    ranked(images, prompts)
    assert (a.count, b.count) == (before[0], before[1] + 8)  # MixGRPO: urls[rank % n]
    dead = rk.load("pickscore", server=["http://127.0.0.1:9", a.url], batch_size=2, backoff=0.0)
    torch.testing.assert_close(dead(images, prompts), expected, rtol=1e-5, atol=1e-5)  # retried on the live one


def test_concurrent_clients_slow_server_nothing_lost(pickscore, servers) -> None:
    """N client threads x M calls over a fast and a slow server: every row scored or NaN with a reason."""
    fast, slow = servers(pickscore), servers(pickscore, delay=4.0)  # margins for a busy 2-core runner
    remote = rk.load("pickscore", server=[slow.url, fast.url], batch_size=2, timeout=2.0, retries=2, backoff=0.0)
    images, prompts = random_images(4, 32, 32, seed=7), ["a", "b", "c", "d"]
    expected = pickscore(images, prompts)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: remote.evaluate(images, prompts), range(12)))
    for out in outs:
        assert out.scores.shape == (4,)
        for score, reason, want in zip(out.scores.tolist(), out.details["failure"], expected.tolist()):
            assert (reason is None and math.isclose(score, want, rel_tol=1e-5, abs_tol=1e-5)) or \
                (math.isnan(score) and reason)
    assert slow.count > 0 and all(torch.isfinite(o.scores).all() for o in outs)  # timed out there, answered here


def test_cli_serve_checks_before_starting_ray(capsys, tmp_path) -> None:
    assert main(["serve", JPEG, "--pickle", "--host", "0.0.0.0"]) == 2
    assert "--pickle-on-network" in capsys.readouterr().err
    assert main(["serve", "pikscore"]) == 2 and "did you mean 'pickscore'" in capsys.readouterr().err
    assert main(["serve", "fid"]) == 2 and "distribution" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing.yaml")]) == 2 and "no such YAML" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("- pickscore\n")
    assert main(["serve", str(tmp_path / "bad.yaml")]) == 2 and "rewards:" in capsys.readouterr().err
    import ray

    assert not ray.is_initialized()
