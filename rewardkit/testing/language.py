"""A tiny, seeded, offline causal language model and tokenizer for TRL trainer tests.

``tiny_causal_lm(root)`` writes a Hugging Face model folder (``config.json``, ``model.safetensors``,
``generation_config.json`` and a fast tokenizer with a chat template) and returns its path, which
``trl.GRPOTrainer(model=path, ...)`` loads with its real code: ``AutoModelForCausalLM.from_pretrained``
for the model and ``AutoProcessor.from_pretrained`` for the tokenizer (trl 1.16
``trainer/grpo_trainer.py`` L348 and L364-L371, which also sets the pad token from the eos token when
missing, L397-L398).

The tokenizer is a byte-level BPE with no merges, built in memory with the ``tokenizers`` library: its
vocabulary is the 256 byte-level characters (GPT-2's byte-to-unicode table) plus a few special tokens,
so every string round-trips and nothing is downloaded. The chat template is ChatML-shaped, so TRL's
conversational path (``apply_chat_template`` on ``[{"role": ..., "content": ...}]`` prompts, completions
decoded into ``[{"role": "assistant", "content": ...}]``, L2244-L2245) runs. The model is a one-layer
``LlamaForCausalLM`` (about 10k parameters) with seeded random weights.

Example:
    >>> path = tiny_causal_lm("/tmp/rk-tiny")
    >>> trainer = trl.GRPOTrainer(model=str(path), reward_funcs=[...], args=..., train_dataset=...)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rewardkit.testing._common import save_hf_model

__all__ = ["TINY_LM_FOLDER", "CHAT_TEMPLATE", "tiny_tokenizer", "tiny_causal_lm"]

TINY_LM_FOLDER = "tiny-causal-lm"  # under ``root``
_EOS, _PAD, _IM_START, _IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
_SPECIALS = (_EOS, _PAD, _IM_START, _IM_END)
_NUM_BYTES = 256
_HIDDEN, _MLP, _LAYERS, _HEADS, _KV_HEADS = 16, 32, 1, 2, 1
_MAX_POSITIONS = 512  # prompt + completion tokens; byte-level, so one token per byte
# ChatML (as in Qwen2 tokenizers): messages wrapped in <|im_start|>role ... <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer() -> Any:
    """A byte-level ``PreTrainedTokenizerFast`` (260 tokens) with eos, pad and a ChatML chat template.

    Returns:
        The tokenizer; ids 0-255 are the byte-level characters, then ``<|endoftext|>`` (eos and bos),
        ``<|pad|>``, ``<|im_start|>``, ``<|im_end|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 byte-level characters, unordered
    vocab = {char: index for index, char in enumerate(sorted(alphabet))}
    if len(vocab) != _NUM_BYTES:
        raise RuntimeError(f"tokenizers' byte-level alphabet has {len(vocab)} characters, expected {_NUM_BYTES}")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_SPECIALS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=_EOS, eos_token=_EOS, pad_token=_PAD,
        additional_special_tokens=[_IM_START, _IM_END], model_max_length=_MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(root: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` and its tokenizer under ``root`` and return the folder.

    Weights are drawn under ``torch.random.fork_rng`` from ``seed``: the caller's global RNG is left
    untouched and the same ``seed`` gives the same checkpoint. An existing folder is overwritten.

    Args:
        root: Parent folder; the checkpoint goes to ``root / "tiny-causal-lm"``.
        seed: Seed of the random weights.

    Returns:
        The checkpoint folder, loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained`` (``local_files_only``), e.g. as ``GRPOTrainer(model=str(path))``.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(root) / TINY_LM_FOLDER
    tokenizer = tiny_tokenizer()
    eos_id, pad_id = tokenizer.convert_tokens_to_ids(_EOS), tokenizer.convert_tokens_to_ids(_PAD)
    end_of_turn_id = tokenizer.convert_tokens_to_ids(_IM_END)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=_HIDDEN, intermediate_size=_MLP, num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS, num_key_value_heads=_KV_HEADS, max_position_embeddings=_MAX_POSITIONS,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=[eos_id, end_of_turn_id],
                                               pad_token_id=pad_id)
    save_hf_model(model, folder)  # every rank writes its folder (transformers 5 saves on rank 0 only)
    tokenizer.save_pretrained(str(folder))
    return folder
