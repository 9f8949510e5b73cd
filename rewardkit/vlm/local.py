"""``TransformersBackend``: in-process, batched, greedy ``generate`` on a Hugging Face VLM folder.

It follows DiffSynth-Studio's generation recipe (``diffsynth/metrics/unified_reward_2.py``,
``unified_reward_edit.py``, ``qwen_image_bench.py``; /work/shared/reference/vlm_family.md §2):
``processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True[, enable_thinking])``,
``processor(text, images, padding=True)``, floating inputs cast to the model dtype,
``model.generate(do_sample=False, max_new_tokens, pad_token_id=tokenizer.pad_token_id,
eos_token_id=tokenizer.eos_token_id[, repetition_penalty])``, prompt cut off,
``batch_decode(skip_special_tokens=True, clean_up_tokenization_spaces=False)``. DiffSynth runs it with
batch 1; here requests with equal settings are batched (``batch_size`` at a time) with LEFT padding, so
every prompt ends at the same column and the generated tokens start at the padded prompt length.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rewardkit.vlm.requests import ChatRequest, Completion, GenerationSettings, check_requests

__all__ = ["TransformersBackend", "resolve_vlm_folder"]

logger = logging.getLogger(__name__)
_ACCEPTED_DTYPES = "None (float32 on CPU, the checkpoint's dtype on an accelerator), 'fp32', 'bf16', 'fp16'"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def resolve_vlm_folder(model: str | Path) -> Path:
    """A local HF folder for ``model`` (a folder, or ``"hf:owner/repo"`` / ``"ms:owner/repo"`` resolved
    with ``rewardkit.weights``).

    Raises:
        FileNotFoundError: no such folder, or one without ``config.json`` and safetensors weights.
    """
    from rewardkit.weights import resolve_weights

    folder = resolve_weights(model, what="VLM model folder")
    missing = [name for name in ("config.json",) if not (folder / name).is_file()]
    if not folder.is_dir() or missing or not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(
            f"VLM model {str(model)!r} resolved to {str(folder)!r}, which is not a Hugging Face model folder "
            f"(expected config.json, {' or '.join(_WEIGHT_FILES)} and the tokenizer/processor files); pass the "
            "folder itself, e.g. the output of rewardkit.testing.tiny_qwen_vl(...) or 'hf:owner/repo'")
    return folder


def _torch_dtype(dtype: Any, device: torch.device) -> Any:
    from rewardkit.precision import parse_dtype

    if dtype is None:
        return torch.float32 if device.type == "cpu" else "auto"
    try:
        return parse_dtype(dtype) or torch.float32
    except ValueError as error:
        raise ValueError(f"TransformersBackend: {error}; accepted: {_ACCEPTED_DTYPES}") from None


class TransformersBackend:
    """Greedy generation with a transformers VLM in this process (a ``GenerationBackend``).

    Args:
        model: a local HF folder (``config.json`` + safetensors + tokenizer/processor files) or
            ``"hf:owner/repo"`` / ``"ms:owner/repo"``. Loaded on first use.
        model_class: ``"auto"`` (``AutoModelForImageTextToText``) or a transformers class name, e.g.
            ``"Qwen3_5ForConditionalGeneration"``.
        device: where the model runs when ``device_map`` is None; None = CPU.
        dtype: None (float32 on CPU, the checkpoint's dtype elsewhere), ``"fp32"``, ``"bf16"``, ``"fp16"``
            or a torch dtype.
        device_map: passed to ``from_pretrained`` (accelerate placement, e.g. ``"auto"`` or a dict with
            ``"cpu"`` / ``"disk"`` entries for CPU offload); excludes ``device``.
        batch_size: requests per ``generate`` call (>= 1).
        processor_kwargs: extra ``AutoProcessor.from_pretrained`` arguments (e.g. ``max_pixels``).
        logits_processor_factory: called once per ``generate`` call; its ``LogitsProcessorList`` is
            passed to ``model.generate`` (tests force known answers with it).
    """

    def __init__(self, model: str | Path, *, model_class: str = "auto", device: Any = None, dtype: Any = None,
                 device_map: Any = None, batch_size: int = 8, processor_kwargs: dict | None = None,
                 logits_processor_factory: Callable[[], Any] | None = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"TransformersBackend: batch_size must be an int >= 1, got {batch_size!r}")
        if device_map is not None and device is not None:
            raise ValueError("TransformersBackend: give device (one device) or device_map (accelerate placement), "
                             "not both")
        self.model_spec, self.model_class, self.batch_size = model, model_class, batch_size
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.device_map, self.processor_kwargs = device_map, dict(processor_kwargs or {})
        self.torch_dtype = _torch_dtype(dtype, self.device)
        self.logits_processor_factory = logits_processor_factory
        self._model: Any = None
        self._processor: Any = None
        self._offloaded = False

    def __repr__(self) -> str:
        state = "offloaded" if self._offloaded else "loaded" if self._model is not None else "not loaded"
        return f"TransformersBackend({str(self.model_spec)!r}, batch_size={self.batch_size}, {state})"

    # ---- loading ---------------------------------------------------------------------------------------
    @property
    def model(self) -> Any:
        """The transformers model (loaded on first access)."""
        if self._model is None:
            self.load()
        return self._model

    @property
    def processor(self) -> Any:
        """The processor (tokenizer + image processor + chat template; loaded on first access)."""
        if self._processor is None:
            self.load()
        return self._processor

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def load(self) -> TransformersBackend:
        """Load the model and processor now (otherwise done by the first ``generate``); returns ``self``."""
        if self._model is not None:
            return self
        import transformers

        folder = resolve_vlm_folder(self.model_spec)
        if self.model_class == "auto":
            cls = transformers.AutoModelForImageTextToText
        else:
            cls = getattr(transformers, self.model_class, None)
            if cls is None or not hasattr(cls, "from_pretrained"):
                raise ValueError(f"TransformersBackend: transformers {transformers.__version__} has no model class "
                                 f"{self.model_class!r}; pass model_class='auto' or e.g. "
                                 "'Qwen3_5ForConditionalGeneration'")
        self._processor = transformers.AutoProcessor.from_pretrained(str(folder), **self.processor_kwargs)
        kwargs: dict[str, Any] = {"dtype": self.torch_dtype}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        model = cls.from_pretrained(str(folder), **kwargs)
        if self.device_map is None:
            model = model.to(self.device)
        self._model = model.eval().requires_grad_(False)
        logger.info("loaded %s from %s (%s)", type(model).__name__, folder, model.dtype)
        return self

    def offload(self) -> None:
        """Move the model to CPU (frees accelerator memory between sampling and scoring)."""
        self._check_movable("offload")
        if self._model is not None and not self._offloaded:
            self._model.to("cpu")
            self._offloaded = True
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def onload(self) -> None:
        """Move the model back to ``device`` after :meth:`offload` (``generate`` does this by itself)."""
        self._check_movable("onload")
        if self._model is not None and self._offloaded:
            self._model.to(self.device)
        self._offloaded = False

    def _check_movable(self, what: str) -> None:
        if self.device_map is not None:
            raise RuntimeError(f"TransformersBackend.{what}(): the model was placed with device_map="
                               f"{self.device_map!r}; accelerate owns its placement, so {what} is not available")

    # ---- generation ------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        """Answer ``requests`` greedily, in order. Requests with equal settings share batches.

        A batch that runs out of accelerator memory is split in halves and retried; a single request
        that still does not fit gives ``Completion(None, error)``.
        """
        check_requests(requests, "TransformersBackend.generate")
        if not requests:
            return []
        self.load()
        if self.device_map is None:
            self.onload()
        results: list[Completion | None] = [None] * len(requests)
        groups: dict[GenerationSettings, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.settings, []).append(index)
        for settings, indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                for index, completion in zip(chunk, self._generate_fitting([requests[i] for i in chunk], settings)):
                    results[index] = completion
        return [c for c in results if c is not None]

    def _generate_fitting(self, batch: list[ChatRequest], settings: GenerationSettings) -> list[Completion]:
        try:
            return [Completion(text) for text in self._generate_batch(batch, settings)]
        except torch.cuda.OutOfMemoryError as error:  # torch.OutOfMemoryError on torch >= 2.5 is the same class
            if len(batch) == 1:
                return [Completion(None, f"out of memory: {str(error)[:300]}")]
            logger.warning("out of memory on a batch of %d; retrying in halves", len(batch))
            half = len(batch) // 2
            return self._generate_fitting(batch[:half], settings) + self._generate_fitting(batch[half:], settings)

    def encode(self, batch: Sequence[ChatRequest], settings: GenerationSettings) -> Any:
        """The processor's left-padded model inputs for ``batch`` (on the model's device and dtype)."""
        processor, tokenizer = self.processor, self.tokenizer
        texts = [processor.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True,
                                               **settings.template_kwargs()) for request in batch]
        images = [image for request in batch for image in request.images()]
        previous = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        finally:
            tokenizer.padding_side = previous
        model = self.model
        return {key: (value.to(model.device, model.dtype) if value.is_floating_point() else value.to(model.device))
                if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}

    def _generate_batch(self, batch: list[ChatRequest], settings: GenerationSettings) -> list[str]:
        inputs = self.encode(batch, settings)
        tokenizer = self.tokenizer
        kwargs: dict[str, Any] = {"do_sample": False, "max_new_tokens": settings.max_new_tokens,
                                  "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        if settings.repetition_penalty is not None:
            kwargs["repetition_penalty"] = settings.repetition_penalty
        if self.logits_processor_factory is not None:
            kwargs["logits_processor"] = self.logits_processor_factory()
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        answers = output[:, inputs["input_ids"].shape[1]:]
        return tokenizer.batch_decode(answers, skip_special_tokens=True, clean_up_tokenization_spaces=False)
