"""HPSv3 (Ma et al., ICCV 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score"): Qwen2-VL-7B + a
regression head read at the ``<|Reward|>`` token; the score is ``mu``, ``details["sigma"] = exp(log_sigma)``.

Upstream: ``MizzenAI/HPSv3`` (the ``hpsv3==1.0.0`` wheel, transformers 4.45.2): ``hpsv3/inference.py``
(``HPSv3RewardInferencer``), ``hpsv3/dataset/data_collator_qwen.py`` (``INSTRUCTION``, the special-token suffix),
``hpsv3/model/qwen2vl_trainer.py`` (the head). DiffSynth-Studio's ``diffsynth/models/hpsv3.py`` and
``diffsynth/metrics/hpsv3.py`` are the second reference (facts: /work/shared/reference/vlm_family.md section 3).

* **Prompt**: one user turn ``[image, INSTRUCTION.format(text_prompt=p) + SUFFIX]`` through the processor's chat
  template with ``add_generation_prompt=True`` (:func:`build_prompt` is byte-exact, pinned by sha256 in tests).
* **Image**: Qwen-VL ``smart_resize`` to ``min_pixels = max_pixels = 256 * 28 * 28`` (<= 256 visual tokens). Exact
  path (:meth:`HPSv3Reward.evaluate_pil`): PIL ``BICUBIC`` resize, then the real processor, as upstream. Tensor path
  (calling the reward): antialiased bicubic in Pillow's pass order (``rewardkit.preprocess.resize_like_pil``), the
  processor's mean / std, and its patch layout (:func:`rewardkit.nets.hpsv3.patchify`): differentiable. Without a
  resize both paths give the same ``pixel_values`` to float32 rounding; with one, the tensor path skips PIL's uint8
  rounding (tests/test_hpsv3.py measures the gap). Upstream's own ``differentiable=True`` mode resizes bilinearly
  without antialiasing instead.
* **Positions** ``position_mode``: ``"sequential"`` (default; upstream, which ran its own forward on transformers
  4.45.2 and fed ``arange(L)`` to all three M-RoPE axes) or ``"mrope"`` (DiffSynth on transformers 5.x: 3-D M-RoPE
  positions). The two give different scores; which one moves real scores by how much is unverified.
* **Batching**: rows are scored in chunks of ``batch_size``, each ONE right-padded forward; with right padding and
  causal attention a row's score does not depend on the others.
* **Precision**: ``dtype=None`` keeps the trunk in float32 (exact); ``"bf16"``/``"fp16"`` store the trunk in that
  dtype, as upstream (``model.to(torch.bfloat16)``; an 8B float32 copy would need 33 GB). The head always runs in
  float32. ``rope_dtype="bf16"`` (default) rounds the rotary frequencies to bf16 values, as upstream's
  ``model.to(torch.bfloat16)`` (and DiffSynth's cast) did to those buffers in training and inference; ``"fp32"``
  keeps them exact (a different score: measured on the tiny model in tests/test_hpsv3.py).
* **Checkpoints**: upstream ``HPSv3.safetensors`` (transformers-4.45 keys ``visual.*``, ``model.*``, ``lm_head.weight``,
  ``rm_head.*``) and DiffSynth ``ImageMetrics/HPSv3/model.safetensors`` (whose layout is unverified: its converter
  accepts the 4.45 keys and the 5.x ``model.visual.*`` / ``model.language_model.*`` keys, and so does
  :func:`hpsv3_key_map`). ``lm_head.weight`` is dropped (never used; 1.1 GB in bf16). Loading is strict.
* **Processor**: ``processor=`` (a folder / spec), else the folder beside the weights if it holds one (DiffSynth's
  ``HPSv3/``), else ``Qwen/Qwen2-VL-7B-Instruct`` (upstream's). ``<|Reward|>`` is added as upstream does.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from rewardkit.errors import check_prompts
from rewardkit.nets.hpsv3 import (
    POSITION_MODES,
    HPSv3Net,
    PositionMode,
    build_hpsv3_net,
    hpsv3_qwen2vl_config,
    patchify,
)
from rewardkit.precision import parse_dtype
from rewardkit.preprocess import normalize, resize_like_pil
from rewardkit.protocols import Reward, RewardOutput
from rewardkit.weights import read_state_dict, resolve_weights

__all__ = ["HPSv3Reward", "load", "build_prompt", "build_messages", "smart_resize", "HPSV3_INSTRUCTION",
           "HPSV3_SUFFIX", "HPSV3_PIXELS", "REWARD_TOKEN", "DEFAULT_WEIGHTS", "DEFAULT_PROCESSOR"]

REWARD_TOKEN = "<|Reward|>"  # hpsv3/train.py create_model_and_processor: special_tokens = ["<|Reward|>"]
HPSV3_PIXELS = 256 * 28 * 28  # hpsv3/inference.py prepare_batch: min_pixels = max_pixels = 256 * 28 * 28
SMART_RESIZE_FACTOR = 28  # patch_size 14 x merge_size 2 (Qwen2-VL)
MAX_ASPECT_RATIO = 200  # qwen-vl-utils / DiffSynth _smart_resize
DEFAULT_WEIGHTS = "hf:MizzenAI/HPSv3/HPSv3.safetensors"  # HPSv3RewardInferencer: hf_hub_download(...)
DEFAULT_PROCESSOR = "hf:Qwen/Qwen2-VL-7B-Instruct"  # config/HPSv3_7B.yaml model_name_or_path
DEFAULT_BATCH_SIZE = 8
WEIGHT_FILES = ("HPSv3.safetensors", "model.safetensors")  # MizzenAI/HPSv3; DiffSynth ImageMetrics/HPSv3/
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # marks a processor folder
_PROCESSOR_PATTERNS = ["*.json", "*.txt", "*.jinja"]  # tokenizer, preprocessor and chat template, not the 16 GB

# hpsv3/dataset/data_collator_qwen.py INSTRUCTION (== DiffSynth HPSV3_INSTRUCTION): 2523 characters, sha256[:16]
# 0393599dad45a971. Written line by line so that the four trailing spaces are explicit.
HPSV3_INSTRUCTION = "\n".join([
    "",
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall "
    "score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being "
    "the best. ",
    "",
    "**Visual Quality:**  ",
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:",
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal "
    "body structures or nonsensical environmental setups.",
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.",
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).",
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.",
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult "
    "material. If such content is present, the image quality and satisfaction score should be the lowest possible. ",
    "",
    "**Text Alignment:**  ",
    "Assess how well the image matches the textual prompt across the following sub-dimensions:",
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align "
    "with the textual description. The subject should match the description in terms of number, appearance, and "
    "behavior.",
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "image adheres to this style.",
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.",
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, "
    "but critical attributes should be preserved.",
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.",
    "Textual prompt - {text_prompt}",
    "", "", "",
])
# data_collator_qwen.py prompt_with_special_token (== DiffSynth HPSV3_PROMPT_WITH_SPECIAL_TOKEN)
HPSV3_SUFFIX = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"


def build_prompt(prompt: str) -> str:
    """The user text of one row: ``HPSV3_INSTRUCTION.format(text_prompt=prompt) + HPSV3_SUFFIX`` (upstream's)."""
    return HPSV3_INSTRUCTION.format(text_prompt=prompt) + HPSV3_SUFFIX


def build_messages(prompt: str) -> list[dict[str, Any]]:
    """One chat: a single user turn ``[image, text]`` (no system turn: the chat template adds its default)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_prompt(prompt)}]}]


def smart_resize(height: int, width: int, factor: int = SMART_RESIZE_FACTOR, min_pixels: int = HPSV3_PIXELS,
                 max_pixels: int = HPSV3_PIXELS) -> tuple[int, int]:
    """Qwen-VL ``smart_resize`` as DiffSynth ``_smart_resize`` / qwen-vl-utils: the ``(height, width)`` to resize to.

    Both sides become multiples of ``factor`` (at least ``factor``), the area is brought into ``[min_pixels,
    max_pixels]`` by flooring (too large) or ceiling (too small) the scaled sides. Examples: 1024x1024 -> 448x448,
    (768, 1360) -> (336, 588).

    Raises:
        ValueError: an aspect ratio above 200, or a non-positive side.
    """
    if height < 1 or width < 1:
        raise ValueError(f"hpsv3: image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"hpsv3: aspect ratio must be at most {MAX_ASPECT_RATIO}, got "
                         f"{max(height, width) / min(height, width):.1f} ({height}x{width}); crop the image first")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class HPSv3Reward(Reward):
    """HPSv3 preference score ``mu`` (higher is better), float32 ``(B,)``; see the module docstring.

    ``details``: ``"mu"`` (= scores), ``"log_sigma"`` and ``"sigma" = exp(log_sigma)`` (the model's uncertainty),
    each float32 ``(B,)``, detached.
    """

    name = "hpsv3"
    higher_is_better = True
    differentiable = True
    requires_prompt = True
    context_keys = frozenset()

    def __init__(self, net: HPSv3Net, processor: Any, *, position_mode: PositionMode = "sequential",
                 min_pixels: int = HPSV3_PIXELS, max_pixels: int = HPSV3_PIXELS,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        super().__init__()
        if position_mode not in POSITION_MODES:
            raise ValueError(f"hpsv3: position_mode must be one of {POSITION_MODES}, got {position_mode!r}")
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"hpsv3: need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
        if batch_size < 1:
            raise ValueError(f"hpsv3: batch_size must be >= 1, got {batch_size}")
        self.net, self.processor = net, processor
        self.position_mode, self.batch_size = position_mode, batch_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        tokenizer = processor.tokenizer
        self.reward_token_id = int(tokenizer.convert_tokens_to_ids(REWARD_TOKEN))
        self.image_token = processor.image_token
        self._reserved = (REWARD_TOKEN, processor.image_token, getattr(processor, "video_token", "<|video_pad|>"))
        vision = net.config.vision_config
        self.patch_size, self.merge_size = vision.patch_size, vision.spatial_merge_size
        self.temporal_patch_size = vision.temporal_patch_size
        self.freeze()

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _check_prompts(self, prompts: list[str]) -> None:
        for i, prompt in enumerate(prompts):
            found = [token for token in self._reserved if token in prompt]
            if found:
                raise ValueError(f"hpsv3: prompts[{i}] contains the special token(s) {found}, which would break the "
                                 "one-reward-token-per-row layout; remove them from the prompt")

    def _texts(self, prompts: list[str]) -> list[str]:
        template = self.processor.apply_chat_template
        return [template(build_messages(p), tokenize=False, add_generation_prompt=True) for p in prompts]

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The ``(height, width)`` an image of this size is resized to (:func:`smart_resize`, this reward's limits)."""
        factor = self.patch_size * self.merge_size
        return smart_resize(height, width, factor, self.min_pixels, self.max_pixels)

    def _forward(self, inputs: dict[str, torch.Tensor]) -> RewardOutput:
        from rewardkit.precision import autocast_for

        device = self.device
        batch = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with autocast_for(device, None):  # the trunk runs in its stored dtype, as upstream; the head in float32
            logits = self.net(batch, self.reward_token_id, self.position_mode)
        mu, log_sigma = logits[:, 0], logits[:, 1]
        return RewardOutput(mu, {"mu": mu.detach(), "log_sigma": log_sigma.detach(), "sigma": log_sigma.detach().exp()})

    def pixel_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """TENSOR path: float ``(B, 3, H, W)`` in [0, 1] -> ``pixel_values`` ``(B * gh * gw, 3 * T * p * p)`` and
        ``image_grid_thw`` ``(B, 3)``, differentiable (resize, then the processor's rescale / normalise / layout)."""
        image_processor = self.processor.image_processor
        height, width = self.target_size(int(images.shape[-2]), int(images.shape[-1]))
        pixels = resize_like_pil(images.float(), (height, width))
        pixels = normalize(pixels, image_processor.image_mean, image_processor.image_std)
        values = patchify(pixels, self.patch_size, self.merge_size, self.temporal_patch_size)
        grid = torch.tensor([[1, height // self.patch_size, width // self.patch_size]] * images.shape[0])
        return {"pixel_values": values, "image_grid_thw": grid}

    def text_inputs(self, prompts: list[str], image_grid_thw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token ids with each row's ``<|image_pad|>`` expanded to its visual-token count, right padded."""
        merge = self.merge_size**2
        texts = []
        for text, grid in zip(self._texts(prompts), image_grid_thw.tolist()):
            head, tail = text.split(self.image_token, 1)  # the template emits one image placeholder per row
            texts.append(head + self.image_token * (grid[0] * grid[1] * grid[2] // merge) + tail)
        tokens = self.processor.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        ids = tokens["input_ids"]
        type_ids = torch.tensor(self.processor.create_mm_token_type_ids(ids.tolist()), dtype=torch.long)
        return {"input_ids": ids, "attention_mask": tokens["attention_mask"], "mm_token_type_ids": type_ids}

    def score(self, images: torch.Tensor, prompts: list[str] | None, **context: Any) -> RewardOutput:
        """Tensor path (differentiable), in chunks of ``batch_size`` rows."""
        assert prompts is not None  # requires_prompt: the base class has checked
        self._check_prompts(prompts)
        parts = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start : start + self.batch_size].to(self.device)
            pixel = self.pixel_inputs(chunk)
            text = self.text_inputs(prompts[start : start + self.batch_size], pixel["image_grid_thw"])
            parts.append(self._forward({**text, **pixel}))
        return _concat(parts, images.device)

    def evaluate_pil(self, images: Any, prompts: str | list[str] | None = None) -> RewardOutput:
        """EXACT path: PIL images or image files of any sizes, preprocessed as upstream (PIL bicubic + processor).

        Returns:
            ``RewardOutput`` with float32 ``(B,)`` scores on the model's device.
        """
        from PIL import Image

        from rewardkit.image_io import as_rgb_images

        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("hpsv3: expected at least one image, got an empty list")
        pils = as_rgb_images(items)
        prompt_list = check_prompts(self.name, prompts, len(pils), True)
        assert prompt_list is not None
        self._check_prompts(prompt_list)
        sizes = [self.target_size(im.height, im.width) for im in pils]
        resized = [im.resize((w, h), Image.Resampling.BICUBIC) for im, (h, w) in zip(pils, sizes)]
        parts = []
        for start in range(0, len(resized), self.batch_size):
            rows = slice(start, start + self.batch_size)
            batch = self.processor(text=self._texts(prompt_list[rows]), images=resized[rows], padding=True,
                                   padding_side="right", return_tensors="pt")
            self._check_grid(batch["image_grid_thw"], sizes[rows])
            parts.append(self._forward(dict(batch)))
        return _concat(parts, self.device)

    def score_pil(self, images: Any, prompts: str | list[str] | None = None) -> torch.Tensor:
        """``evaluate_pil(...).scores``: float32 ``(B,)``."""
        return self.evaluate_pil(images, prompts).scores

    def _check_grid(self, grid: torch.Tensor, sizes: list[tuple[int, int]]) -> None:
        expected = [[1, h // self.patch_size, w // self.patch_size] for h, w in sizes]
        if grid.tolist() != expected:
            raise ValueError(f"hpsv3: the processor resized the images again (grid {grid.tolist()} instead of "
                             f"{expected}): its min_pixels / max_pixels exclude {sizes}; pass a processor whose limits "
                             "include them (Qwen2-VL-7B-Instruct's: 3136 and 12845056) or other min/max_pixels")


def _concat(parts: list[RewardOutput], device: torch.device) -> RewardOutput:
    scores = torch.cat([p.scores for p in parts]).to(device)
    return RewardOutput(scores, {k: torch.cat([p.details[k] for p in parts]).to(device) for k in parts[0].details})


def _weight_file(weights: Any) -> Path:
    path = resolve_weights(weights, allow_patterns=_PROCESSOR_PATTERNS + list(WEIGHT_FILES), what="hpsv3 weights")
    if not path.is_dir():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"hpsv3: {path} holds none of {WEIGHT_FILES}; pass the checkpoint file itself")


def _coerce_config(config: Any) -> Any:
    from transformers import Qwen2VLConfig

    if config is None:
        return hpsv3_qwen2vl_config()
    if isinstance(config, dict):
        return Qwen2VLConfig(**config)
    if isinstance(config, (str, Path)):
        return Qwen2VLConfig.from_json_file(str(config))
    if isinstance(config, Qwen2VLConfig):
        return config
    raise TypeError(f"hpsv3: config must be a Qwen2VLConfig, a dict of its fields or a config.json path, "
                    f"got {type(config).__name__}")


def load_processor(processor: Any, weight_file: Path, **kwargs: Any) -> Any:
    """The Qwen2-VL processor (right padding) with ``<|Reward|>`` added as upstream does; see the module docstring."""
    from transformers import AutoProcessor

    if processor is not None:
        folder = resolve_weights(processor, allow_patterns=_PROCESSOR_PATTERNS, what="hpsv3 processor")
    elif any((weight_file.parent / name).is_file() for name in PROCESSOR_FILES):
        folder = weight_file.parent  # DiffSynth's HPSv3/ folder keeps the processor beside the weights
    else:
        folder = resolve_weights(DEFAULT_PROCESSOR, allow_patterns=_PROCESSOR_PATTERNS, what="hpsv3 processor")
    proc = AutoProcessor.from_pretrained(str(folder), padding_side="right", **kwargs)
    proc.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    return proc


def load(weights: Any = None, device: Any = None, dtype: Any = None, *, config: Any = None, processor: Any = None,
         position_mode: PositionMode = "sequential", min_pixels: int = HPSV3_PIXELS, max_pixels: int = HPSV3_PIXELS,
         batch_size: int = DEFAULT_BATCH_SIZE, processor_kwargs: dict[str, Any] | None = None,
         rope_dtype: Any = "bf16") -> HPSv3Reward:
    """Load HPSv3.

    Args:
        weights: ``HPSv3.safetensors`` / DiffSynth ``HPSv3/model.safetensors`` (a file, a folder holding one,
            ``hf:`` / ``ms:``); default ``hf:MizzenAI/HPSv3/HPSv3.safetensors``.
        device: where the model lives (default CPU).
        dtype: ``None`` (float32 trunk) or ``"bf16"`` / ``"fp16"`` (trunk stored in that dtype; head float32).
        config: a ``transformers.Qwen2VLConfig``, a dict of its fields or a ``config.json`` path, for other sizes;
            default Qwen2-VL-7B with a 151658-token vocabulary (:func:`rewardkit.nets.hpsv3.hpsv3_qwen2vl_config`).
        processor: a Qwen2-VL processor folder / spec (default: beside the weights, else Qwen2-VL-7B-Instruct).
        position_mode: ``"sequential"`` (upstream HPSv3) or ``"mrope"`` (DiffSynth-Studio on transformers 5.x).
        min_pixels, max_pixels: the smart-resize area limits (upstream: both ``256 * 28 * 28``).
        batch_size: rows per forward pass.
        processor_kwargs: passed to ``AutoProcessor.from_pretrained``.
        rope_dtype: ``"bf16"`` (upstream's rotary frequencies), ``"fp16"`` or ``"fp32"`` (exact frequencies).
    """
    weight_file = _weight_file(weights or DEFAULT_WEIGHTS)
    proc = load_processor(processor, weight_file, **(processor_kwargs or {}))
    cfg = _coerce_config(config)
    vocab = cfg.text_config.vocab_size
    if len(proc.tokenizer) > vocab:
        raise ValueError(f"hpsv3: the processor's tokenizer has {len(proc.tokenizer)} tokens with <|Reward|> but the "
                         f"model's vocabulary has {vocab}; pass the processor of these weights (processor=...)")
    net = build_hpsv3_net(read_state_dict(weight_file, unwrap=("model",)), cfg, parse_dtype(dtype),
                          parse_dtype(rope_dtype))
    reward = HPSv3Reward(net, proc, position_mode=position_mode, min_pixels=min_pixels, max_pixels=max_pixels,
                         batch_size=batch_size)
    return reward.to(torch.device("cpu") if device is None else torch.device(device))
