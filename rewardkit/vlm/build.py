"""``build_backend``: the one place that turns a judge loader's keyword arguments into a generation backend.

Every generative judge's loader (``rk.load("unified-reward-2", ...)`` and friends) accepts the same three
ways to get answers (/work/shared/reference/vlm_family.md §9.5):

* ``weights=`` (None = the registry's upstream repo) plus ``device`` / ``dtype`` / ``device_map`` /
  ``batch_size``: an in-process :class:`~rewardkit.vlm.local.TransformersBackend`;
* ``server="http://host:8000/v1"`` plus ``served_model`` / ``api_key`` / ``max_concurrency`` /
  ``timeout`` / ``retries`` / ``image_format`` / ``batch_timeout`` (a deadline for one ``evaluate`` call):
  an :class:`~rewardkit.vlm.served.OpenAIChatBackend`;
* ``backend=<any GenerationBackend>``: used as is.

Mixing options of two ways raises ``ValueError`` naming the conflict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rewardkit.vlm.requests import GenerationBackend

__all__ = ["build_backend"]

_LOCAL_OPTIONS = ("device", "dtype", "device_map", "batch_size", "model_class", "processor_kwargs",
                  "logits_processor_factory")
_SERVED_OPTIONS = ("served_model", "api_key", "max_concurrency", "timeout", "retries", "backoff", "image_format",
                   "batch_timeout")


def build_backend(name: str, *, default_weights: str, weights: str | Path | None = None, server: str | None = None,
                  backend: GenerationBackend | None = None, model_class: str = "auto",
                  **options: Any) -> GenerationBackend:
    """The backend a judge named ``name`` should use.

    Args:
        name: the judge's registry name (for error messages).
        default_weights: the upstream model spec used when ``weights`` is None (e.g.
            ``"hf:CodeGoat24/UnifiedReward-2.0-qwen35-9b"``).
        weights: a local HF folder or ``"hf:"`` / ``"ms:"`` spec for an in-process model.
        server: the base URL of an OpenAI-compatible server (vLLM, SGLang) serving the judge.
        backend: a ready :class:`~rewardkit.vlm.requests.GenerationBackend`.
        model_class: the transformers class of the in-process model (``"auto"`` or a class name).
        **options: the in-process options (``device``, ``dtype``, ``device_map``, ``batch_size``,
            ``processor_kwargs``, ``logits_processor_factory``) or the server options (``served_model``, ``api_key``,
            ``max_concurrency``, ``timeout``, ``retries``, ``backoff``, ``image_format``, ``batch_timeout``); None values are
            ignored.

    Raises:
        ValueError: options of two ways mixed, or an unknown option.
        TypeError: a ``backend`` without a ``generate`` method.
    """
    given = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(given) - set(_LOCAL_OPTIONS) - set(_SERVED_OPTIONS))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; in-process options: {_LOCAL_OPTIONS}, "
                         f"server options: {_SERVED_OPTIONS}")
    local = sorted(k for k in given if k in _LOCAL_OPTIONS) + (["weights"] if weights is not None else [])
    served = sorted(k for k in given if k in _SERVED_OPTIONS)
    if backend is not None:
        if server is not None or local or served:
            raise ValueError(f"{name}: backend= is used as is; drop {sorted([*local, *served]) or ['server']}")
        if not callable(getattr(backend, "generate", None)):
            raise TypeError(f"{name}: backend must have a generate(requests) method, got {type(backend).__name__}")
        return backend
    if server is not None:
        if local:
            raise ValueError(f"{name}: server= runs the model elsewhere; {local} only apply to an in-process model")
        from rewardkit.vlm.served import OpenAIChatBackend

        return OpenAIChatBackend(server, **given)
    if served:
        raise ValueError(f"{name}: {served} only apply with server='http://host:port/v1'")
    from rewardkit.vlm.local import TransformersBackend

    return TransformersBackend(default_weights if weights is None else weights, model_class=model_class, **given)
