"""Pure request / answer types shared by every generative (VLM) judge and every generation backend.

A judge (``rewardkit.vlm.judge.GenerativeJudge``) turns images and prompts into :class:`ChatRequest`
objects, a backend (in-process ``TransformersBackend`` or the OpenAI-compatible ``OpenAIChatBackend``)
turns them into :class:`Completion` objects, and the judge parses those. The split follows the
upstream practice of keeping prompt builders and parsers as pure functions beside an exchangeable
generation service (CodeGoat24/UnifiedReward ``vllm_qwen/vllm_request.py``, yifan123/flow_grpo
``flow_grpo/rewards.py``); see /work/shared/reference/vlm_family.md §2 and §9.5.

No heavy import here: this module is safe to import anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

__all__ = ["check_requests", "DEFAULT_MAX_NEW_TOKENS", "GenerationSettings", "ChatRequest", "Completion", "GenerationBackend",
           "check_messages"]

DEFAULT_MAX_NEW_TOKENS = 1024  # DiffSynth-Studio diffsynth/metrics/unified_reward_2.py default
_ROLES = ("system", "user", "assistant")
_ITEM_TYPES = ("image", "text")


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate one answer. Generation is always greedy.

    Locally this means ``do_sample=False``; on an OpenAI-compatible server ``temperature=0``.

    Attributes:
        max_new_tokens: the most tokens to generate (``max_tokens`` on a server).
        repetition_penalty: HF ``repetition_penalty`` (vLLM/SGLang accept it as an extra field);
            ``None`` means not passed locally and not sent to a server.
        enable_thinking: passed to the chat template (``chat_template_kwargs`` on a server);
            ``None`` means the template's own default.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    repetition_penalty: float | None = None
    enable_thinking: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"GenerationSettings: max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(
                f"GenerationSettings: repetition_penalty must be > 0 (1.0 = off) or None, got {self.repetition_penalty!r}"
            )
        if self.enable_thinking is not None and not isinstance(self.enable_thinking, bool):
            raise TypeError(
                f"GenerationSettings: enable_thinking must be True, False or None, got {self.enable_thinking!r}"
            )

    def template_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``apply_chat_template`` (empty when ``enable_thinking`` is None)."""
        return {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}


@dataclass
class ChatRequest:
    """One chat to answer greedily.

    Attributes:
        messages: Hugging Face chat format, ``[{"role": "system" | "user" | "assistant", "content":
            [item, ...]}]`` where each item is ``{"type": "image", "image": PIL.Image.Image}`` (RGB) or
            ``{"type": "text", "text": str}``. A plain string ``content`` is allowed for text-only turns.
        settings: generation settings; requests with equal settings are batched together.
        meta: free-form labels for the judge that built the request (e.g. ``{"dimension": "Quality"}``);
            backends ignore it.
    """

    messages: list[dict]
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    meta: dict[str, Any] = field(default_factory=dict)

    def images(self) -> list[Any]:
        """The PIL images of every message, in order of appearance."""
        return [item["image"] for message in self.messages if not isinstance(message["content"], str)
                for item in message["content"] if item.get("type") == "image"]


@dataclass
class Completion:
    """A backend's answer to one :class:`ChatRequest`.

    Attributes:
        text: the decoded answer only (prompt cut off, ``skip_special_tokens=True``,
            ``clean_up_tokenization_spaces=False``); ``None`` when generation failed.
        error: why ``text`` is ``None`` (timeout, HTTP status and body excerpt, exception text).
    """

    text: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when an answer came back."""
        return self.text is not None


@runtime_checkable
class GenerationBackend(Protocol):
    """Anything that answers chat requests greedily, in order: one :class:`Completion` per request."""

    def generate(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        ...


def check_requests(requests: Sequence[Any], where: str) -> None:
    """Raise unless every item is a :class:`ChatRequest` with valid messages (a backend's input check)."""
    for i, request in enumerate(requests):
        if not isinstance(request, ChatRequest):
            raise TypeError(f"{where}: requests[{i}] is {type(request).__name__}, expected rewardkit.vlm.ChatRequest")
        check_messages(request.messages, f"{where}: requests[{i}]")


def check_messages(messages: Any, where: str = "ChatRequest") -> None:
    """Validate the chat structure of one request.

    Raises:
        TypeError: messages that are not a list of dicts, or an image item that is not a PIL image.
        ValueError: an unknown role or item type, a missing key, or no message at all.
    """
    from PIL import Image

    if not isinstance(messages, list) or not messages:
        raise TypeError(f"{where}: messages must be a non-empty list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES or "content" not in message:
            raise ValueError(f"{where}: messages[{i}] must be a dict with 'role' in {_ROLES} and 'content', "
                             f"got {message!r:.120}")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise TypeError(f"{where}: messages[{i}]['content'] must be a str or a list of items")
        for j, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind not in _ITEM_TYPES or kind not in item:
                raise ValueError(f"{where}: messages[{i}]['content'][{j}] must be {{'type': 'image', 'image': "
                                 f"PIL.Image}} or {{'type': 'text', 'text': str}}, got {item!r:.120}")
            if kind == "image" and not isinstance(item["image"], Image.Image):
                raise TypeError(f"{where}: messages[{i}]['content'][{j}]['image'] must be a PIL.Image.Image, "
                                f"got {type(item['image']).__name__}; convert with rewardkit.image_io")
            if kind == "text" and not isinstance(item["text"], str):
                raise TypeError(f"{where}: messages[{i}]['content'][{j}]['text'] must be a str")
