"""Wire formats of ``rewardkit serve`` and of the remote-reward client.

Safe formats (``POST /score``), never pickle:

* ``safetensors`` (``Content-Type: application/vnd.rewardkit.safetensors``, the client's default): a
  safetensors body with one float32 tensor ``images`` ``(B, 3, H, W)`` in ``[0, 1]``, sent exactly (the
  served scores equal in-process ones); prompts and per-row context ride in the safetensors header
  metadata as JSON strings (``"prompts"``, ``"context"``).
* ``json`` (``application/json``): ``{"images": [base64 PNG, ...], "prompts": [...] | null, "context":
  {...}}``. PNG is 8 bit: a float image is rounded to the nearest 1/255 before sending (stated, and the
  reason ``safetensors`` is the default). Images may differ in size.

Both are answered with JSON ``{"scores": [float | null], "failures": [str | null], "details": {...}}``:
a ``null`` score is a NaN row and its ``failures`` entry says why (JSON has no NaN).

The field's pickle protocol (``POST /``, yifan123/reward-server ``app_geneval.py`` / ``app_deqa.py`` and
the flow_grpo / ddpo-pytorch clients in ``flow_grpo/rewards.py`` ``geneval_score`` / ``deqa_score_remote``;
verl-omni ``verl_omni/utils/reward_score/http_scorer_client.py``): the body is ``pickle.dumps({"images":
[JPEG bytes, ...], "prompts": [...]?, "meta_datas": [...]? (flow_grpo) or "metadata": {...}? (verl-omni),
"only_strict": bool?})`` and the answer ``pickle.dumps({"scores": [...], ...})`` (DeQA answers
``"outputs"``; verl-omni reads ``scores`` and raises on an ``error`` key). Unpickling is code execution: both sides here read pickles with :class:`_SafeUnpickler`,
an allow-list of plain containers and numpy arrays (upstream clients pickle ``np.array_split`` pieces),
which narrows but does not make trustworthy a pickle from an untrusted peer.
"""

from __future__ import annotations

import base64
import io
import json
import math
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Batch", "Scored", "JSON", "SAFETENSORS", "encode_request", "decode_request", "encode_response",
           "decode_response", "encode_pickle_request", "decode_pickle_request", "encode_pickle_response",
           "decode_pickle_response", "WireError"]

JSON = "application/json"
SAFETENSORS = "application/vnd.rewardkit.safetensors"
_UINT8_MAX = 255  # 8-bit PNG / JPEG full scale
# flow_grpo/rewards.py geneval_score: `img.save(buffer, format="JPEG")`, i.e. PIL's default quality (75).
REWARD_SERVER_JPEG_QUALITY = 75


class WireError(ValueError):
    """A request or response body that does not follow the wire format (the server answers HTTP 400)."""


@dataclass
class Batch:
    """One decoded request: ``images`` ``(3, H, W)`` float32 tensors in ``[0, 1]`` (sizes may differ),
    ``prompts`` (``B`` strings or ``None``) and ``context`` (keyword arguments of the reward, e.g.
    ``metadata``; a list of ``B`` items is per row, any other value is given to every row)."""

    images: list[torch.Tensor]
    prompts: list[str] | None = None
    context: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class Scored:
    """Scores of one batch: ``scores`` (``B`` floats, NaN where a row failed), ``failures`` (``B`` reasons,
    ``None`` where scored) and ``details`` (``{key: list of B JSON values}``)."""

    scores: list[float]
    failures: list[str | None]
    details: dict[str, list] = field(default_factory=dict)


def _check_batch(images: torch.Tensor, prompts: list[str] | None, what: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise TypeError(f"{what}: expected images as a float tensor (B, 3, H, W) in [0, 1], got "
                        f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}; convert with "
                        "rewardkit.image_io.to_tensor")
    if images.numel() and not (images.min() >= 0 and images.max() <= 1):  # NaN fails both comparisons
        raise ValueError(f"{what}: image values must lie in [0, 1], got [{images.min().item():g}, "
                         f"{images.max().item():g}]; rescale (e.g. (x + 1) / 2 for [-1, 1]) before sending")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise ValueError(f"{what}: {len(prompts)} prompts for {images.shape[0]} images; pass one per image")


def _uint8_rows(images: torch.Tensor) -> Any:
    """``(B, 3, H, W)`` in ``[0, 1]`` -> uint8 ``(B, H, W, 3)`` numpy, rounded to the nearest level."""
    return (images.detach().float().cpu() * _UINT8_MAX).round().to(torch.uint8) \
        .permute(0, 2, 3, 1).numpy()


def _encode_image(array: Any, fmt: str, quality: int | None = None) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({} if quality is None else {"quality": quality}))
    return buffer.getvalue()


def _decode_image(data: Any, index: int) -> torch.Tensor:
    from PIL import Image

    from rewardkit.image_io import _DECODE_ERRORS, as_rgb, pil_to_tensor

    if not isinstance(data, (bytes, bytearray)):
        raise WireError(f"images[{index}]: expected encoded image bytes (PNG/JPEG), got {type(data).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return pil_to_tensor(as_rgb(image))
    except _DECODE_ERRORS as error:
        raise WireError(f"images[{index}]: not a decodable image ({type(error).__name__}: {error})") from None


def _check_prompts(prompts: Any, batch: int) -> list[str] | None:
    if prompts is None:
        return None
    prompts = [str(p) for p in prompts] if hasattr(prompts, "tolist") else prompts  # numpy arrays of str
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise WireError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
    if len(prompts) != batch:
        raise WireError(f"prompts: {len(prompts)} prompts for {batch} images; send one per image")
    return list(prompts)


# ---- safe formats ----------------------------------------------------------------------------------
def encode_request(images: torch.Tensor, prompts: list[str] | None = None, context: dict[str, Any] | None = None,
                   fmt: str = "safetensors") -> tuple[bytes, str]:
    """Client side: ``(body, content type)`` of ``POST /score``. ``context`` must be JSON-serialisable."""
    _check_batch(images, prompts, "encode_request")
    try:
        context_text = json.dumps(context or {}, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"encode_request: context must be JSON-serialisable (lists, dicts, str, finite numbers) to "
                        f"travel to the server, got {error}") from None
    if fmt == "safetensors":
        from safetensors.torch import save

        header = {"context": context_text, **({} if prompts is None else {"prompts": json.dumps(list(prompts))})}
        return save({"images": images.detach().float().cpu().contiguous()}, metadata=header), SAFETENSORS
    if fmt == "json":
        pngs = [base64.b64encode(_encode_image(row, "PNG")).decode("ascii") for row in _uint8_rows(images)]
        body = {"images": pngs, "prompts": None if prompts is None else list(prompts), "context": json.loads(context_text)}
        return json.dumps(body).encode("utf-8"), JSON
    raise ValueError(f"encode_request: fmt must be 'safetensors' or 'json', got {fmt!r}")


def decode_request(body: bytes, content_type: str | None) -> Batch:
    """Server side: a ``POST /score`` body -> :class:`Batch`. Raises :class:`WireError` on a malformed body."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == SAFETENSORS:
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(bytes(body))
            header = json.loads(body[8 : 8 + int.from_bytes(body[:8], "little")]).get("__metadata__") or {}
            prompts, context = json.loads(header.get("prompts", "null")), json.loads(header.get("context", "{}"))
        except (SafetensorError, ValueError, TypeError) as error:
            raise WireError(f"malformed safetensors body: {error}") from None
        images = tensors.get("images")
        if images is None or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise WireError("safetensors body: expected a float tensor 'images' (B, 3, H, W)")
        if images.numel() and not (images.min() >= 0 and images.max() <= 1):  # NaN fails both comparisons
            raise WireError("safetensors body: image values must lie in [0, 1]")
        rows = list(images.float().unbind(0))
    elif kind == JSON:
        try:
            payload = json.loads(body)
            rows = [_decode_image(base64.b64decode(item, validate=True), i) for i, item in enumerate(payload["images"])]
            prompts, context = payload.get("prompts"), payload.get("context") or {}
        except (ValueError, KeyError, TypeError) as error:
            raise WireError(f"malformed JSON body (need images: [base64 PNG], prompts, context): {error}") from None
    else:
        raise WireError(f"unsupported Content-Type {content_type!r}; send {SAFETENSORS} or {JSON}")
    if not isinstance(context, dict):
        raise WireError(f"context: expected a JSON object of reward keyword arguments, got {type(context).__name__}")
    return Batch(rows, _check_prompts(prompts, len(rows)), context)


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def encode_response(scored: Scored) -> bytes:
    """Server side: JSON answer (NaN -> ``null``, its reason in ``failures``)."""
    details = {key: [_json_value(v) for v in values] for key, values in scored.details.items()}
    body = {"scores": [_json_value(s) for s in scored.scores], "failures": scored.failures, "details": details}
    return json.dumps(body, allow_nan=False).encode("utf-8")


def decode_response(body: bytes, batch: int) -> Scored:
    """Client side: the JSON answer of ``POST /score`` -> :class:`Scored` (``null`` -> NaN)."""
    try:
        payload = json.loads(body)
        scores = [math.nan if s is None else float(s) for s in payload["scores"]]
        failures = list(payload.get("failures") or [None] * len(scores))
    except (ValueError, KeyError, TypeError) as error:
        raise WireError(f"malformed answer (need scores: [float | null]): {error}; body {body[:200]!r}") from None
    if len(scores) != batch or len(failures) != batch:
        raise WireError(f"the server answered {len(scores)} scores for {batch} images")
    failures = [f if f is not None or math.isfinite(s) else "the server returned no score and no reason"
                for s, f in zip(scores, failures)]
    return Scored(scores, failures, dict(payload.get("details") or {}))


# ---- the field's pickle protocol (explicit opt-in only) --------------------------------------------
class _SafeUnpickler(pickle.Unpickler):
    """Only plain containers and numpy arrays / scalars; any other global raises (no arbitrary callables)."""

    _ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                          ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                          ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "complex"), ("builtins", "set"),
                          ("builtins", "frozenset"), ("collections", "OrderedDict")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a reward-server pickle")
        return super().find_class(module, name)


def _safe_loads(body: bytes, what: str) -> Any:
    try:
        return _SafeUnpickler(io.BytesIO(body)).load()
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a malformed body
        raise WireError(f"{what}: not a reward-server pickle ({type(error).__name__}: {error})") from None


def encode_pickle_request(images: torch.Tensor, prompts: list[str] | None = None, metadata: list | None = None,
                          only_strict: bool | None = None, quality: int = REWARD_SERVER_JPEG_QUALITY) -> bytes:
    """Client side: the reward-server body (JPEG bytes at PIL's default quality, as flow_grpo sends)."""
    _check_batch(images, prompts, "encode_pickle_request")
    payload: dict[str, Any] = {"images": [_encode_image(row, "JPEG", quality) for row in _uint8_rows(images)]}
    if prompts is not None:
        payload["prompts"] = list(prompts)
    if metadata is not None:
        payload["meta_datas"] = list(metadata)
    if only_strict is not None:
        payload["only_strict"] = bool(only_strict)
    return pickle.dumps(payload)


def decode_pickle_request(body: bytes) -> Batch:
    """Server side: a reward-server body -> :class:`Batch` (``meta_datas`` -> ``context["metadata"]``)."""
    payload = _safe_loads(body, "request")
    if not isinstance(payload, dict) or "images" not in payload:
        raise WireError("reward-server request: expected a pickled dict with 'images' (a list of JPEG/PNG bytes)")
    rows = [_decode_image(item, i) for i, item in enumerate(payload["images"])]
    context: dict[str, Any] = {}
    # flow_grpo sends per-row "meta_datas"; verl-omni's http_scorer_client always sends "metadata": {} (no rows)
    metadata = payload.get("meta_datas") if payload.get("meta_datas") is not None else payload.get("metadata")
    if metadata:
        context["metadata"] = [dict(m) if isinstance(m, dict) else m for m in metadata] \
            if isinstance(metadata, (list, tuple)) or hasattr(metadata, "tolist") else metadata
    return Batch(rows, _check_prompts(payload.get("prompts"), len(rows)), context)


def encode_pickle_response(scored: Scored) -> bytes:
    """Server side: ``{"scores", "outputs", "failures", **details}`` (``outputs`` for DeQA-style clients)."""
    return pickle.dumps({"scores": list(scored.scores), "outputs": list(scored.scores), "failures": scored.failures,
                         **{k: v for k, v in scored.details.items() if k not in ("scores", "outputs", "failures")}})


def decode_pickle_response(body: bytes, batch: int) -> Scored:
    """Client side: a reward-server answer (``scores`` or DeQA's ``outputs``) -> :class:`Scored`."""
    payload = _safe_loads(body, "answer")
    values = payload.get("scores", payload.get("outputs")) if isinstance(payload, dict) else None
    if values is None:
        raise WireError(f"reward-server answer: no 'scores' or 'outputs' list (keys: "
                        f"{sorted(payload) if isinstance(payload, dict) else type(payload).__name__})")
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    if len(values) != batch:
        raise WireError(f"reward-server answer: {len(values)} scores for {batch} images")
    scores = [math.nan if v is None else float(v) for v in values]
    failures = list(payload.get("failures") or [None] * batch)
    failures = [f if f is not None or math.isfinite(s) else "the server returned NaN without a reason"
                for s, f in zip(scores, failures)]
    return Scored(scores, failures)
