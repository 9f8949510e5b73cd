"""Shared plumbing of the generative (VLM) judges: requests, generation backends and the judge base class.

* :mod:`rewardkit.vlm.requests`: ``GenerationSettings``, ``ChatRequest``, ``Completion``,
  ``GenerationBackend`` (pure dataclasses and a protocol).
* :mod:`rewardkit.vlm.local`: ``TransformersBackend``, in-process batched greedy ``generate``.
* :mod:`rewardkit.vlm.served`: ``OpenAIChatBackend``, a client of an OpenAI-compatible server
  (vLLM, SGLang) at ``/v1/chat/completions``.
* :mod:`rewardkit.vlm.judge`: ``GenerativeJudge`` (a ``rewardkit.protocols.Reward``) and ``ParsedAnswer``.
* :mod:`rewardkit.vlm.build`: ``build_backend``, the ``weights=`` / ``server=`` / ``backend=`` choice every
  judge loader offers.

Everything is exported lazily: ``import rewardkit.vlm`` imports neither transformers nor requests.
The design (prompt builders and parsers as pure functions beside an exchangeable generation service)
follows /work/shared/reference/vlm_family.md §9.5.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["GenerationSettings", "ChatRequest", "Completion", "GenerationBackend", "TransformersBackend",
           "OpenAIChatBackend", "GenerativeJudge", "ParsedAnswer", "tensor_to_pil", "build_backend"]

_WHERE = {
    "GenerationSettings": "requests", "ChatRequest": "requests", "Completion": "requests",
    "GenerationBackend": "requests", "TransformersBackend": "local", "OpenAIChatBackend": "served",
    "GenerativeJudge": "judge", "ParsedAnswer": "judge", "tensor_to_pil": "judge", "build_backend": "build",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'rewardkit.vlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"rewardkit.vlm.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
