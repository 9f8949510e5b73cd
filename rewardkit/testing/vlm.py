"""Tiny, seeded, offline Qwen VLM folders (model + tokenizer + processor + chat template) for the VLM judges.

``tiny_qwen_vl(root, family)`` writes a Hugging Face folder that ``AutoProcessor.from_pretrained`` and
``rewardkit.vlm.TransformersBackend`` load offline, for the three architectures the VLM rewards sit on
(/work/shared/reference/vlm_family.md §1 and §8.1): ``qwen2_vl`` (``Qwen2VLForConditionalGeneration``,
HPSv3), ``qwen3_vl`` (``Qwen3VLForConditionalGeneration``, UnifiedReward Edit) and ``qwen3_5``
(``Qwen3_5ForConditionalGeneration``, UnifiedReward 2.0 and Qwen-Image-Bench). Config sizes follow §8.1.

The tokenizer is a byte-level BPE with no merges (every string round-trips) plus Qwen's special tokens,
``<|Reward|>`` (HPSv3's reward token) and ``<think>`` / ``</think>`` as ordinary added tokens, so they
survive ``skip_special_tokens=True`` as on the tiny models of §8.1. The chat templates are small
Qwen-shaped Jinja templates: Qwen2-VL inserts the default system turn, Qwen3-VL does not, and Qwen3.5
opens a ``<think>`` block unless ``enable_thinking`` is false (the Qwen3.6 default of §4.2).

``forced_answer_processor(tokenizer, text)`` makes greedy generation emit exactly ``text`` then EOS, so
tests can check that parsed scores equal known numbers through the real generation path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from rewardkit.testing._common import save_hf_model, spread_weights

__all__ = ["VLM_FAMILIES", "VLM_MODEL_CLASSES", "TINY_VLM_IMAGE_SIZE", "tiny_qwen_tokenizer",
           "tiny_qwen_processor", "write_tiny_qwen_processor", "tiny_qwen_vl_config", "tiny_qwen_vl",
           "forced_answer_processor", "ForcedAnswer"]

Family = Literal["qwen2_vl", "qwen3_vl", "qwen3_5"]
VLM_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen3_vl", "qwen3_5")
VLM_MODEL_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
                     "qwen3_5": "Qwen3_5ForConditionalGeneration"}
TINY_VLM_IMAGE_SIZE = 64  # pixels a side in tests: 4x4 merged patches at patch 14 or 16 (§8.1)
EOS, PAD = "<|im_end|>", "<|endoftext|>"
IM_START, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (
    "<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
REWARD_TOKEN = "<|Reward|>"  # MizzenAI/HPSv3 hpsv3/dataset/data_collator_qwen.py special token
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_SPECIALS = (EOS, PAD, IM_START, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, REWARD_TOKEN)
_NUM_BYTES = 256
_HIDDEN, _MLP, _HEADS, _KV_HEADS, _MAX_POSITIONS = 64, 128, 4, 2, 4096  # §8.1 text sizes
_PATCH = {"qwen2_vl": 14, "qwen3_vl": 16, "qwen3_5": 16}  # vision patch size per family (§8.1)
_MERGE, _TEMPORAL = 2, 2
_MIN_PIXELS, _MAX_PIXELS = 56 * 56, 128 * 28 * 28  # tiny image-processor limits (§8.1)
_DECAY_LOW, _DECAY_HIGH = 0.02, 0.2  # tiny Gated-DeltaNet decay rates exp(A_log), see _soften_linear_attention_decay
_QWEN2_SYSTEM = "You are a helpful assistant."  # Qwen2-VL-Instruct's default system turn (§3.2)

_TEMPLATE_BODY = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
)
_QWEN2_SYSTEM_DEFAULT = ("{%- if messages[0]['role'] != 'system' -%}"
                         "{{- '<|im_start|>system\n" + _QWEN2_SYSTEM + "<|im_end|>\n' -}}{%- endif -%}")
_GEN_OPTIONAL_THINK = ("{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}"
                       "{%- if enable_thinking is defined and enable_thinking -%}{{- '<think>\n' -}}{%- endif -%}"
                       "{%- endif -%}")
_GEN_DEFAULT_THINK = ("{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}"
                      "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\n\n</think>\n\n' -}}"
                      "{%- else -%}{{- '<think>\n' -}}{%- endif -%}{%- endif -%}")
CHAT_TEMPLATES = {
    "qwen2_vl": _QWEN2_SYSTEM_DEFAULT + _TEMPLATE_BODY + _GEN_OPTIONAL_THINK,
    "qwen3_vl": _TEMPLATE_BODY + _GEN_OPTIONAL_THINK,
    "qwen3_5": _TEMPLATE_BODY + _GEN_DEFAULT_THINK,
}


def _check_family(family: str) -> None:
    if family not in VLM_FAMILIES:
        raise ValueError(f"unknown tiny VLM family {family!r}; choose one of {VLM_FAMILIES}")


def tiny_qwen_tokenizer(extra_special_tokens: tuple[str, ...] = ()) -> Any:
    """A byte-level ``PreTrainedTokenizerFast`` with Qwen's special tokens, built in memory.

    Ids 0-255 are the byte-level characters; then ``<|im_end|>`` (eos), ``<|endoftext|>`` (pad),
    ``<|im_start|>``, the vision tokens, ``<|Reward|>``, ``extra_special_tokens``, and finally
    ``<think>`` / ``</think>`` as non-special added tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: index for index, char in enumerate(sorted(alphabet))}
    if len(vocab) != _NUM_BYTES:
        raise RuntimeError(f"tokenizers' byte-level alphabet has {len(vocab)} characters, expected {_NUM_BYTES}")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    specials = [*_SPECIALS, *extra_special_tokens]
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD,
                                        additional_special_tokens=[t for t in specials if t not in (EOS, PAD)],
                                        model_max_length=_MAX_POSITIONS)
    tokenizer.add_tokens([THINK_OPEN, THINK_CLOSE])
    return tokenizer


def tiny_qwen_processor(family: Family, tokenizer: Any | None = None) -> Any:
    """The offline processor of ``family``: ``Qwen2VLProcessor`` (qwen2_vl) or ``Qwen3VLProcessor``.

    Args:
        family: ``"qwen2_vl"``, ``"qwen3_vl"`` or ``"qwen3_5"``.
        tokenizer: defaults to :func:`tiny_qwen_tokenizer`; the family's chat template is set on it.
    """
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    _check_family(family)
    tokenizer = tokenizer if tokenizer is not None else tiny_qwen_tokenizer()
    template = CHAT_TEMPLATES[family]
    tokenizer.chat_template = template
    image_processor = Qwen2VLImageProcessor(patch_size=_PATCH[family], merge_size=_MERGE,
                                            temporal_patch_size=_TEMPORAL, min_pixels=_MIN_PIXELS,
                                            max_pixels=_MAX_PIXELS)
    if family == "qwen2_vl":
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=Qwen2VLVideoProcessor(), chat_template=template)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(patch_size=_PATCH[family]), chat_template=template)


def write_tiny_qwen_processor(folder: str | Path, family: Family, tokenizer: Any | None = None) -> Any:
    """Save :func:`tiny_qwen_processor` (tokenizer, image/video processor, chat template) into ``folder``.

    HPSv3's builder reuses this for its processor folder. Returns the processor.
    """
    processor = tiny_qwen_processor(family, tokenizer)
    Path(folder).mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(str(folder))
    return processor


def _ids(tokenizer: Any) -> dict[str, int]:
    names = {"eos": EOS, "pad": PAD, "image": IMAGE_PAD, "video": VIDEO_PAD, "start": VISION_START,
             "end": VISION_END}
    return {key: int(tokenizer.convert_tokens_to_ids(token)) for key, token in names.items()}


def _text_config(family: str, vocab: int, ids: dict[str, int]) -> dict[str, Any]:
    text = {"vocab_size": vocab, "hidden_size": _HIDDEN, "intermediate_size": _MLP, "num_attention_heads": _HEADS,
            "num_key_value_heads": _KV_HEADS, "max_position_embeddings": _MAX_POSITIONS,
            "eos_token_id": ids["eos"], "pad_token_id": ids["pad"], "bos_token_id": None,
            "tie_word_embeddings": False}
    if family == "qwen2_vl":  # head_dim 16: mrope sections sum to 8
        text.update(num_hidden_layers=2, rope_parameters={"rope_type": "default", "type": "mrope",
                                                          "mrope_section": [2, 3, 3], "rope_theta": 1e6})
    elif family == "qwen3_vl":
        text.update(num_hidden_layers=2, head_dim=16, rope_parameters={
            "rope_type": "default", "mrope_interleaved": True, "mrope_section": [2, 3, 3], "rope_theta": 5e6})
    else:  # qwen3_5: 3 Gated-DeltaNet layers + 1 full attention; rotary dim 16 * 0.25 = 4
        text.update(num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"], head_dim=16,
                    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                    linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=4,
                    partial_rotary_factor=0.25, rope_parameters={
                        "rope_type": "default", "mrope_interleaved": True, "mrope_section": [1, 1, 0],
                        "rope_theta": 1e7, "partial_rotary_factor": 0.25})
    return text


def _vision_config(family: str) -> dict[str, Any]:
    if family == "qwen2_vl":
        return {"depth": 2, "embed_dim": 32, "hidden_size": _HIDDEN, "mlp_ratio": 2, "num_heads": 2,
                "patch_size": 14, "spatial_merge_size": _MERGE, "temporal_patch_size": _TEMPORAL}
    return {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": _HIDDEN,
            "patch_size": 16, "spatial_merge_size": _MERGE, "temporal_patch_size": _TEMPORAL,
            "num_position_embeddings": 64, "deepstack_visual_indexes": [0] if family == "qwen3_vl" else []}


def tiny_qwen_vl_config(family: Family, tokenizer: Any) -> Any:
    """The tiny transformers config of ``family`` for ``tokenizer``'s vocabulary and special-token ids."""
    from transformers import AutoConfig

    _check_family(family)
    ids = _ids(tokenizer)
    return AutoConfig.for_model(
        family, text_config=_text_config(family, len(tokenizer), ids), vision_config=_vision_config(family),
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"], eos_token_id=ids["eos"], pad_token_id=ids["pad"], bos_token_id=None,
        tie_word_embeddings=False)


def _soften_linear_attention_decay(model: torch.nn.Module, seed: int) -> None:
    """Give Qwen3.5's Gated-DeltaNet layers a slow decay so earlier tokens (the image) reach the answer.

    The library init ``A_log ~ log U(0, 16)`` makes the recurrent state of a 64-wide random layer
    forget everything but the current token (the last hidden state moved by ~1e-5 when the image
    changed), so greedy answers ignored the input. Decay rates ``exp(A_log) ~ U(0.02, 0.2)`` fix it.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.empty(param.shape).uniform_(_DECAY_LOW, _DECAY_HIGH, generator=generator).log())


def tiny_qwen_vl(root: str | Path, family: Family, seed: int = 0) -> Path:
    """Write a tiny random Qwen VLM folder under ``root / f"tiny-{family}"`` and return its path.

    The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors`` and the
    processor files of :func:`write_tiny_qwen_processor`. Weights are drawn under
    ``torch.random.fork_rng`` from ``seed`` and re-spread (``spread_weights``) so that the image and
    the text both move the logits. The same ``seed`` gives the same folder; an existing one is
    overwritten.
    """
    import transformers
    from transformers import GenerationConfig

    _check_family(family)
    folder = Path(root) / f"tiny-{family}"
    processor = write_tiny_qwen_processor(folder, family)
    config = tiny_qwen_vl_config(family, processor.tokenizer)
    model_class = getattr(transformers, VLM_MODEL_CLASSES[family])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).eval()
    spread_weights(model, seed)
    _soften_linear_attention_decay(model, seed)
    ids = _ids(processor.tokenizer)
    model.generation_config = GenerationConfig(eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    save_hf_model(model, folder)
    return folder


class ForcedAnswer:
    """A logits processor that forces greedy generation to emit ``token_ids`` then ``eos_id``.

    The prompt length is taken at the first call of each ``generate`` (a call whose sequence is not
    the previous one plus one token starts a new generation), so one instance serves many calls.
    """

    def __init__(self, token_ids: list[int], eos_id: int) -> None:
        self.token_ids, self.eos_id = list(token_ids), int(eos_id)
        self._start = self._last = -1
        self._prefix: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length = input_ids.shape[1]
        continuing = (length == self._last + 1 and self._prefix is not None
                      and self._prefix.shape == input_ids[:, :self._start].shape
                      and torch.equal(self._prefix, input_ids[:, :self._start]))
        if not continuing:
            self._start, self._prefix = length, input_ids.clone()
        self._last = length
        step = length - self._start
        target = self.token_ids[step] if step < len(self.token_ids) else self.eos_id
        forced = torch.full_like(scores, float("-inf"))
        forced[:, target] = 0.0
        return forced


def forced_answer_processor(tokenizer: Any, text: str) -> Any:
    """A ``LogitsProcessorList`` making greedy generation answer exactly ``text`` (then EOS) for every row.

    Args:
        tokenizer: the model's tokenizer (or a processor with ``.tokenizer``); its ``eos_token_id``
            ends the answer.
        text: the answer; it must round-trip through the tokenizer (true for the byte-level tiny
            tokenizer, special tokens excepted since decoding skips them).
    """
    from transformers import LogitsProcessorList

    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) != text:
        raise ValueError(f"forced answer {text!r:.80} does not round-trip through the tokenizer; "
                         "drop special tokens from it")
    return LogitsProcessorList([ForcedAnswer(token_ids, tokenizer.eos_token_id)])
