"""``OpenAIChatBackend``: greedy answers from an OpenAI-compatible server (vLLM, SGLang, ``transformers serve``).

Upstream UnifiedReward and Pref-GRPO serve their judges with ``vllm serve`` and post chat requests from a
thread pool with retries (CodeGoat24/UnifiedReward ``vllm_qwen/vllm_request.py``: images as base64 JPEG
q95 ``data:`` URLs, images first; CodeGoat24/Pref-GRPO ``fastvideo/rewards/unifiedreward.py``); Flow-GRPO
does the same against SGLang with temperature 0 and PNG images (yifan123/flow_grpo ``flow_grpo/rewards.py``).
See /work/shared/reference/vlm_family.md §4.2, §4.5, §5.5 and §6.5.

This client posts ``/v1/chat/completions`` with the judge's messages (images as PNG ``data:`` URLs by
default, so the server sees the exact pixels; ``image_format="jpeg"`` mimics the upstream clients),
``temperature: 0`` and ``max_tokens``; ``repetition_penalty`` and ``chat_template_kwargs:
{"enable_thinking": ...}`` (extra fields vLLM and SGLang accept) only when set. Upstream's ``do_sample:
False`` is not an OpenAI field and is not sent. At most ``max_concurrency`` requests are in flight; each
has a ``timeout`` and is retried ``retries`` times with exponential backoff on connection errors,
timeouts, HTTP 429 and 5xx. A request that still fails becomes ``Completion(None, error)``: one bad
answer never loses the batch. Without a deadline a stalled server holds a batch for about
``ceil(B / max_concurrency) × (retries + 1) × timeout`` (96 min for B = 256 with the defaults);
``batch_timeout=`` bounds one ``generate`` call: requests still unanswered when it passes become
``Completion(None, "batch deadline of Xs passed; ...")`` (NaN rows with that reason in a judge), answered
ones are kept. Only the standard library is used.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import Any, Literal, Sequence

from rewardkit.vlm.requests import ChatRequest, Completion, check_requests

__all__ = ["OpenAIChatBackend", "encode_image", "to_openai_messages"]

logger = logging.getLogger(__name__)
JPEG_QUALITY = 95  # CodeGoat24/UnifiedReward vllm_qwen/vllm_request.py: image.save(..., "JPEG", quality=95)
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_EXCERPT = 300  # characters of an error body kept in Completion.error
_DEADLINE_PREFIX = "batch deadline of"
_DEADLINE_GRACE = 0.05  # seconds past batch_timeout that generate() waits for answers already being read


def encode_image(image: Any, image_format: Literal["png", "jpeg"] = "png", quality: int = JPEG_QUALITY) -> str:
    """A PIL image as a ``data:image/...;base64,...`` URL (PNG lossless, or JPEG at ``quality``)."""
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return f"data:image/{image_format};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def to_openai_messages(messages: list[dict], image_format: Literal["png", "jpeg"] = "png",
                       quality: int = JPEG_QUALITY) -> list[dict]:
    """HF chat messages -> OpenAI chat messages (image items become ``image_url`` data URLs, order kept)."""
    converted = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [{"type": "image_url", "image_url": {"url": encode_image(item["image"], image_format, quality)}}
                       if item["type"] == "image" else {"type": "text", "text": item["text"]} for item in content]
        converted.append({"role": message["role"], "content": content})
    return converted


class _Retryable(Exception):
    """A failure worth another try (connection error, timeout, 429/5xx)."""


class OpenAIChatBackend:
    """A ``GenerationBackend`` that asks an OpenAI-compatible ``/v1/chat/completions`` server.

    Args:
        base_url: the API root, e.g. ``"http://host:8000/v1"`` (``/v1`` is appended to a bare
            ``http://host:port``).
        served_model: the ``model`` field (vLLM's ``--served-model-name``); None asks ``/v1/models``
            once and uses the first id.
        api_key: sent as ``Authorization: Bearer <key>`` when given (SGLang/vLLM ``--api-key``).
        max_concurrency: the most requests in flight at once (>= 1).
        timeout: seconds per request attempt (connect and each read).
        retries: extra attempts after a connection error, timeout, HTTP 408/429/5xx.
        backoff: seconds before the first retry; doubled for each further one.
        image_format: ``"png"`` (lossless, the default) or ``"jpeg"`` (quality ``jpeg_quality``, as the
            upstream UnifiedReward client sends).
        jpeg_quality: JPEG quality when ``image_format="jpeg"``.
        batch_timeout: seconds one ``generate`` call may take in all (None = no deadline). Requests not
            answered by then fail with a "batch deadline" error; attempts and retry waits are cut to
            the time left, so the call returns about then.
    """

    def __init__(self, base_url: str, *, served_model: str | None = None, api_key: str | None = None,
                 max_concurrency: int = 16, timeout: float = 120.0, retries: int = 2, backoff: float = 1.0,
                 image_format: Literal["png", "jpeg"] = "png", jpeg_quality: int = JPEG_QUALITY,
                 batch_timeout: float | None = None) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"OpenAIChatBackend: base_url must be an http(s) URL like 'http://host:8000/v1', "
                             f"got {base_url!r}")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"OpenAIChatBackend: max_concurrency must be an int >= 1, got {max_concurrency!r}")
        if not timeout > 0 or isinstance(retries, bool) or not isinstance(retries, int) or retries < 0 or backoff < 0:
            raise ValueError(f"OpenAIChatBackend: need timeout > 0, an int retries >= 0 and backoff >= 0, got "
                             f"timeout={timeout!r}, retries={retries!r}, backoff={backoff!r}")
        if batch_timeout is not None and (isinstance(batch_timeout, bool) or not isinstance(batch_timeout, (int, float))
                                          or not 0 < batch_timeout < math.inf):
            raise ValueError(f"OpenAIChatBackend: batch_timeout must be a number of seconds > 0 or None (no "
                             f"deadline), got {batch_timeout!r}")
        if image_format not in ("png", "jpeg"):
            raise ValueError(f"OpenAIChatBackend: image_format must be 'png' or 'jpeg', got {image_format!r}")
        root = base_url.rstrip("/")
        self.base_url = root if root.count("/") > 2 else root + "/v1"
        self.served_model, self.api_key = served_model, api_key
        self.max_concurrency, self.timeout, self.retries, self.backoff = max_concurrency, float(timeout), retries, backoff
        self.image_format, self.jpeg_quality = image_format, jpeg_quality
        self.batch_timeout = None if batch_timeout is None else float(batch_timeout)

    def __repr__(self) -> str:
        return (f"OpenAIChatBackend({self.base_url!r}, served_model={self.served_model!r}, "
                f"max_concurrency={self.max_concurrency})")

    # ---- HTTP ------------------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _call(self, path: str, payload: dict | None, deadline: float | None = None) -> Any:
        """One HTTP attempt; returns the decoded JSON body. Raises ``_Retryable`` or ``RuntimeError``."""
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(self.base_url + path, data=data, headers=self._headers(),
                                         method="GET" if payload is None else "POST")
        timeout = self.timeout if deadline is None else min(self.timeout, deadline - time.monotonic())
        if timeout <= 0:
            raise RuntimeError(self._deadline_message())
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            excerpt = error.read()[:_EXCERPT].decode("utf-8", "replace")
            message = f"HTTP {error.code}: {excerpt}"
            raise (_Retryable if error.code in _RETRY_STATUS else RuntimeError)(message) from None
        except http.client.HTTPException as error:  # a connection cut mid-answer (IncompleteRead, BadStatusLine)
            raise _Retryable(f"connection error: {type(error).__name__}: {error}") from None
        except (TimeoutError, OSError) as error:  # URLError, refused connections and socket timeouts
            reason = getattr(error, "reason", error)
            kind = "timeout" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else "connection error"
            raise _Retryable(f"{kind} after {timeout:.3g} s limit: {reason}" if kind == "timeout"
                             else f"{kind}: {reason}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise RuntimeError(f"malformed response (not JSON): {body[:_EXCERPT].decode('utf-8', 'replace')!r}") from None

    def _with_retries(self, path: str, payload: dict | None, deadline: float | None = None) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return self._call(path, payload, deadline)
            except _Retryable as error:
                if deadline is not None and time.monotonic() + self.backoff * 2**attempt >= deadline:
                    raise RuntimeError(f"{self._deadline_message()}; last attempt: {error}") from None
                if attempt == self.retries:
                    raise RuntimeError(f"{error} (after {attempt + 1} attempts)") from None
                logger.info("retrying %s after: %s", path, error)
                time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _deadline_message(self, answered: int | None = None, total: int | None = None) -> str:
        done = "" if answered is None else f"; {answered} of {total} requests were answered in time"
        return (f"{_DEADLINE_PREFIX} {self.batch_timeout:g}s passed{done}; raise batch_timeout= or max_concurrency=, "
                "or check the server's load")

    def model_name(self, deadline: float | None = None) -> str:
        """The ``model`` field sent: ``served_model``, or the first id ``/v1/models`` lists (cached)."""
        if self.served_model is None:
            try:
                listing = self._with_retries("/models", None, deadline)
                self.served_model = str(listing["data"][0]["id"])
            except (RuntimeError, KeyError, IndexError, TypeError) as error:
                raise RuntimeError(f"OpenAIChatBackend: could not read the served model name from "
                                   f"{self.base_url}/models ({error}); pass served_model='...'") from None
        return self.served_model

    # ---- generation ------------------------------------------------------------------------------------
    def payload(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body posted for ``request``."""
        settings = request.settings
        body: dict[str, Any] = {
            "model": self.model_name(),
            "messages": to_openai_messages(request.messages, self.image_format, self.jpeg_quality),
            "temperature": 0, "max_tokens": settings.max_new_tokens,
        }
        if settings.repetition_penalty is not None:
            body["repetition_penalty"] = settings.repetition_penalty
        if settings.enable_thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": settings.enable_thinking}
        return body

    def _one(self, request: ChatRequest, deadline: float | None = None) -> Completion:
        try:
            answer = self._with_retries("/chat/completions", self.payload(request), deadline)
        except RuntimeError as error:
            return Completion(None, str(error))
        except Exception as error:  # anything else (e.g. an image that fails to encode) fails this request only
            logger.exception("request to %s failed", self.base_url)
            return Completion(None, f"client error: {type(error).__name__}: {error}")
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return Completion(None, f"malformed response (no choices[0].message.content): {str(answer)[:_EXCERPT]}")
        reasoning = choice["message"].get("reasoning_content") or choice["message"].get("reasoning")
        if (not isinstance(text, str) or not text.strip()) and isinstance(reasoning, str) and reasoning.strip():
            # A reasoning parser (vLLM --reasoning-parser, transformers serve with enable_thinking) put everything
            # in the reasoning field: the thinking never ended (max_tokens too small) or the server did not split
            # it. Parsing the thinking as the verdict would score the wrong text, so the row fails with this reason.
            return Completion(None, f"no answer: the engine returned only reasoning_content ({len(reasoning)} "
                              f"characters, finish_reason={choice.get('finish_reason')!r}); raise max_new_tokens, "
                              "set enable_thinking=False, or check the server's reasoning parser")
        if not isinstance(text, str):
            return Completion(None, f"no answer text (finish_reason={choice.get('finish_reason')!r})")
        return Completion(text)

    def generate(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        """Answer ``requests`` greedily, in order, at most ``max_concurrency`` at a time; never raises for a
        failed request (it becomes ``Completion(None, error)``)."""
        check_requests(requests, "OpenAIChatBackend.generate")
        if not requests:
            return []
        deadline = None if self.batch_timeout is None else time.monotonic() + self.batch_timeout
        try:
            self.model_name(deadline)
        except RuntimeError as error:
            logger.warning("%s", error)
            return [Completion(None, str(error)) for _ in requests]
        workers = min(self.max_concurrency, len(requests))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rk-vlm-client")
        try:
            futures = [pool.submit(self._one, request, deadline) for request in requests]
            # Attempts are cut to the deadline, so running requests end about then; the small grace lets
            # an answer that is being read finish instead of racing the clock.
            wait_for(futures, timeout=None if deadline is None else max(0.0, deadline - time.monotonic())
                     + _DEADLINE_GRACE)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # never wait past the deadline for stragglers
        results = [f.result() if f.done() and not f.cancelled() else None for f in futures]
        # One reason for every request the deadline cut: never sent, still running, or stopped by it mid-way.
        cut = [r is None or (r.text is None and (r.error or "").startswith(_DEADLINE_PREFIX)) for r in results]
        late = Completion(None, self._deadline_message(len(cut) - sum(cut), len(cut))) if any(cut) else None
        completions = [late if was_cut else result for result, was_cut in zip(results, cut)]
        failed = sum(c.text is None for c in completions)
        if failed:
            logger.warning("%s: %d of %d requests failed; first error: %s", self.base_url, failed, len(completions),
                           next(c.error for c in completions if c.text is None))
        return completions
