"""``RemoteReward``: a RewardFn that scores on reward servers (``rewardkit serve`` or yifan123/reward-server).

``rk.load(name, server=URL)`` builds one for any non-generative registry entry (VLM judges keep their own
``server=``: an OpenAI-compatible server). Like the judges' client (``rewardkit/vlm/served.py``) it
splits a call into requests of ``batch_size`` rows, keeps at most ``max_concurrency`` requests in flight
(shared by every thread that calls the reward), gives each attempt ``timeout`` seconds and retries
connection errors, timeouts, HTTP 408/429/5xx with exponential backoff on another server when there is one;
the whole call has a ``batch_timeout`` deadline. A request that still fails becomes NaN rows with the
reason in ``details["failure"]``: every row comes back, scored or NaN with a reason; the call never raises
for a server failure.

Several URLs spread the requests: ``balance="least-loaded"`` (fewest requests in flight, the default)
or ``"rank"`` (MixGRPO's ``urls[rank % n]`` per training process, ``rank`` defaulting to ``$RANK``), both
falling back to the other servers on a retry.
"""

from __future__ import annotations

import http.client
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Sequence

import torch
from torch import nn

from rewardkit.errors import check_images, check_prompts
from rewardkit.protocols import RewardOutput
from rewardkit.serve.wire import (Scored, WireError, decode_pickle_response, decode_response,
                                  encode_pickle_request, encode_request)

__all__ = ["RemoteReward", "load_remote", "PROTOCOLS"]

logger = logging.getLogger(__name__)
PROTOCOLS = ("safetensors", "json", "reward-server")
BALANCE = ("least-loaded", "rank")
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_EXCERPT = 300  # characters of an error body kept in a failure reason


class _Retryable(Exception):
    """A failure worth another try (connection error, timeout, 408/429/5xx)."""


def _check_url(url: Any) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"RemoteReward: server must be an http(s) URL like 'http://127.0.0.1:8000' or a list of them, "
                         f"got {url!r}")
    return url.rstrip("/")


class RemoteReward(nn.Module):
    """A non-differentiable RewardFn scored on remote servers.

    Args:
        server: one URL or a list of URLs serving the same reward.
        name, higher_is_better, requires_prompt: the reward's description (``rk.load`` takes them from the
            registry; :meth:`from_server` reads them from ``GET /ready``).
        protocol: ``"safetensors"`` (float32 images sent exactly, the default), ``"json"`` (8-bit PNGs) or
            ``"reward-server"`` (the field's pickle protocol on ``POST /``: JPEG images, as flow_grpo sends).
        batch_size: image rows per request.
        max_concurrency: requests in flight at once, over every thread calling this reward.
        timeout: seconds per request attempt. batch_timeout: seconds per call (``None``: no deadline).
        retries: extra attempts per request; backoff: seconds before the first retry, doubled each time.
        balance: ``"least-loaded"`` or ``"rank"`` (``urls[rank % n]`` first). rank: default ``$RANK`` or 0.
        only_strict: sent to a reward-server GenEval (flow_grpo's ``only_strict`` flag) when set.
    """

    differentiable = False

    def __init__(self, server: str | Sequence[str], *, name: str = "remote", higher_is_better: bool = True,
                 requires_prompt: bool = True, protocol: str = "safetensors", batch_size: int = 32,
                 max_concurrency: int = 8, timeout: float = 60.0, batch_timeout: float | None = None,
                 retries: int = 2, backoff: float = 0.5, balance: str = "least-loaded", rank: int | None = None,
                 only_strict: bool | None = None) -> None:
        super().__init__()
        urls = [server] if isinstance(server, str) else list(server)
        if not urls:
            raise ValueError("RemoteReward: server= needs at least one URL, got an empty list")
        self.urls = [_check_url(u) for u in urls]
        if protocol not in PROTOCOLS:
            raise ValueError(f"RemoteReward: protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if balance not in BALANCE:
            raise ValueError(f"RemoteReward: balance must be one of {BALANCE}, got {balance!r}")
        for key, value in (("batch_size", batch_size), ("max_concurrency", max_concurrency)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RemoteReward: {key} must be an int >= 1, got {value!r}")
        if not timeout > 0 or (batch_timeout is not None and not batch_timeout > 0) or retries < 0 or backoff < 0:
            raise ValueError(f"RemoteReward: need timeout > 0, batch_timeout > 0 or None, retries >= 0, backoff >= 0; "
                             f"got {timeout!r}, {batch_timeout!r}, {retries!r}, {backoff!r}")
        self.name, self.higher_is_better, self.requires_prompt = name, bool(higher_is_better), bool(requires_prompt)
        self.protocol, self.batch_size, self.max_concurrency = protocol, batch_size, max_concurrency
        self.timeout, self.batch_timeout, self.retries, self.backoff = float(timeout), batch_timeout, retries, backoff
        self.balance, self.only_strict = balance, only_strict
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else int(rank)
        self._init_state()

    def _init_state(self) -> None:
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._lock = threading.Lock()
        self._in_flight = [0] * len(self.urls)

    def __getstate__(self) -> dict[str, Any]:  # picklable: locks are rebuilt on the other side
        state = self.__dict__.copy()
        for key in ("_slots", "_lock", "_in_flight"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_state()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, urls={self.urls}, protocol={self.protocol!r}"

    @classmethod
    def from_server(cls, server: str | Sequence[str], **options: Any) -> RemoteReward:
        """Describe the reward from the first server's ``GET /ready`` (``rewardkit serve`` only)."""
        import json

        url = _check_url(server if isinstance(server, str) else list(server)[0])
        with urllib.request.urlopen(url + "/ready", timeout=options.get("timeout", 60.0)) as response:
            info = json.loads(response.read())
        return cls(server, name=info["name"], higher_is_better=info["higher_is_better"],
                   requires_prompt=info["requires_prompt"], **options)

    # ---- routing ---------------------------------------------------------------------------------------
    def _pick(self, attempt: int, tried: set[int]) -> int:
        with self._lock:
            if self.balance == "rank" and attempt == 0:
                index = self.rank % len(self.urls)
            else:
                fresh = [i for i in range(len(self.urls)) if i not in tried] or list(range(len(self.urls)))
                index = min(fresh, key=lambda i: (self._in_flight[i], (i - self.rank) % len(self.urls)))
            self._in_flight[index] += 1
            return index

    def _post(self, url: str, body: bytes, content_type: str, timeout: float) -> bytes:
        path = "/" if self.protocol == "reward-server" else "/score"
        request = urllib.request.Request(url + path, data=body, method="POST", headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            message = f"HTTP {error.code} from {url}: {error.read()[:_EXCERPT].decode('utf-8', 'replace')}"
            raise (_Retryable if error.code in _RETRY_STATUS else RuntimeError)(message) from None
        except http.client.HTTPException as error:  # a connection cut mid-answer
            raise _Retryable(f"connection error from {url}: {type(error).__name__}: {error}") from None
        except (TimeoutError, OSError) as error:  # URLError, refused connections, socket timeouts
            reason = getattr(error, "reason", error)
            timed_out = isinstance(reason, TimeoutError) or "timed out" in str(reason)
            raise _Retryable(f"timeout after {timeout:g} s from {url}" if timed_out
                             else f"connection error from {url}: {reason}") from None

    def _request(self, rows: int, body: bytes, content_type: str, deadline: float | None) -> Scored:
        """One request with retries; never raises (a failure becomes NaN rows with the reason)."""
        tried: set[int] = set()
        error_text = "no attempt made"
        for attempt in range(self.retries + 1):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                error_text = f"timeout: the batch deadline of {self.batch_timeout:g} s passed ({error_text})"
                break
            index = self._pick(attempt, tried)
            tried.add(index)
            try:
                with self._slots:
                    answer = self._post(self.urls[index], body, content_type, min(self.timeout, left or self.timeout))
                return decode_pickle_response(answer, rows) if self.protocol == "reward-server" \
                    else decode_response(answer, rows)
            except _Retryable as error:
                error_text = f"{error} (after {attempt + 1} attempts)"
                logger.info("retrying after: %s", error)
                pause = self.backoff * 2**attempt
                if attempt < self.retries and (deadline is None or time.monotonic() + pause < deadline):
                    time.sleep(pause)
            except (RuntimeError, WireError) as error:
                error_text = str(error)
                break
            finally:
                with self._lock:
                    self._in_flight[index] -= 1
        return Scored([math.nan] * rows, [error_text] * rows)

    # ---- RewardFn --------------------------------------------------------------------------------------
    def _encode(self, images: torch.Tensor, prompts: list[str] | None, context: dict[str, Any]) -> tuple[bytes, str]:
        if self.protocol == "reward-server":
            unknown = sorted(set(context) - {"metadata"})
            if unknown:
                raise TypeError(f"{self.name}: the reward-server protocol carries only metadata=, got {unknown}")
            return encode_pickle_request(images, prompts, context.get("metadata"), self.only_strict), \
                "application/octet-stream"
        return encode_request(images, prompts, context, self.protocol)

    def evaluate(self, images: torch.Tensor, prompts: str | list[str] | None = None, **context: Any) -> RewardOutput:
        """Score ``images`` ``(B, 3, H, W)`` in ``[0, 1]`` remotely -> ``RewardOutput`` with ``scores`` ``(B,)``
        float32 on ``images.device`` and ``details["failure"]`` (the reason per NaN row, else None).

        Context values that are lists of ``B`` items are split with the rows; other values go with every request.
        """
        check_images(self.name, images)
        batch = images.shape[0]
        prompt_list = check_prompts(self.name, prompts, batch, self.requires_prompt)
        starts = list(range(0, batch, self.batch_size))
        bodies = []  # encoded before any request: bad input raises here, before network work
        for start in starts:
            end = min(start + self.batch_size, batch)
            part = {k: (v[start:end] if isinstance(v, (list, tuple)) and len(v) == batch else v) for k, v in context.items()}
            bodies.append((end - start, *self._encode(images[start:end], None if prompt_list is None
                                                       else prompt_list[start:end], part)))
        deadline = None if self.batch_timeout is None else time.monotonic() + self.batch_timeout
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(bodies)) or 1, thread_name_prefix="rk-remote")
        futures = [pool.submit(self._request, rows, body, kind, deadline) for rows, body, kind in bodies]
        done, _ = wait(futures, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        pool.shutdown(wait=False, cancel_futures=True)  # late requests end by their own per-attempt timeout
        parts = [f.result() if f in done else Scored([math.nan] * rows, [f"timeout: no answer within the batch "
                 f"deadline of {self.batch_timeout:g} s"] * rows) for f, (rows, _, _) in zip(futures, bodies)]
        return _merge(parts, images.device, self.name)

    def forward(self, images: torch.Tensor, prompts: str | list[str] | None = None, **context: Any) -> torch.Tensor:
        """``evaluate(...).scores``: ``(B,)`` float32 on ``images.device``."""
        return self.evaluate(images, prompts, **context).scores


def _merge(parts: list[Scored], device: torch.device, name: str) -> RewardOutput:
    scores = [s for part in parts for s in part.scores]
    failures = [f for part in parts for f in part.failures]
    details: dict[str, Any] = {"failure": failures}
    for key in dict.fromkeys(k for part in parts for k in part.details):
        details[key] = [v for part in parts for v in part.details.get(key, [None] * len(part.scores))]
    failed = sum(f is not None for f in failures)
    if failed:
        logger.warning("%s: %d of %d rows failed; first reason: %s", name, failed, len(failures),
                       next(f for f in failures if f is not None))
    return RewardOutput(torch.tensor(scores, dtype=torch.float32, device=device), details)


def load_remote(name: str, weights: Any = None, device: Any = None, dtype: Any = None, *,
                server: str | Sequence[str], entry: Any = None, **options: Any) -> RemoteReward:
    """``rk.load(name, server=URL, ...)`` for a reward served elsewhere (``rewardkit serve`` or reward-server).

    ``entry`` (the registry's ``Entry``, handed over by ``rk.load``) gives the name and direction; without one
    (an unregistered name, e.g. a served YAML composition) the server's ``GET /ready`` describes the reward.
    ``weights`` and ``dtype`` belong to the server and must be unset; ``device`` is accepted and unused (scores
    land on the images' device).
    """
    if weights is not None or dtype not in (None, "fp32"):
        raise ValueError(f"{name}: weights= and dtype= are the server's (set them on `rewardkit serve`), got "
                         f"weights={weights!r}, dtype={dtype!r}; drop them with server=")
    if entry is None:
        return RemoteReward.from_server(server, **options)
    if entry.kind != "reward":
        raise ValueError(f"{name} is a {entry.kind} metric (update/compute), which is not served; only per-image "
                         "rewards take server=")
    return RemoteReward(server, name=entry.name, higher_is_better=entry.higher_is_better,
                        requires_prompt=entry.requires_prompt, **options)
