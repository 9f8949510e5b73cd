"""ImageReward (Xu et al., NeurIPS 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation").

Upstream: ``THUDM/ImageReward`` (c1392c6) ``ImageReward/ImageReward.py`` (``score``, ``inference_rank``,
``score_gard``) on the BLIP code in ``ImageReward/models/BLIP/`` (``rewardkit.nets.blip``):

    reward = (MLP(text_encoder(ids, mask, cross-attending to ViT(image))[:, 0]) - mean) / std

with the prompt tokenized by bert-base-uncased's WordPiece plus the special tokens ``[DEC]`` (bos) and
``[ENC]`` (``BLIP/blip.py init_tokenizer``), padded to ``max_length`` 35. ``[ENC]`` is *not*
substituted for ``[CLS]`` (BLIP's ITM head does that; ImageReward does not). The ``[CLS]`` feature goes
to the MLP in float32, as in upstream ``score``; rewardkit also runs the MLP and the normalisation in
float32 on the bf16/fp16 paths (DiffSynth-Studio's ``ImageRewardMetric`` crashes under bf16 because its
fp32 MLP receives bf16 features, reference/clip_family.md E6).

Checkpoints (``rewardkit.weights``, strict): upstream ``ImageReward.pt`` (a plain state dict, optionally
``module.``-prefixed) and DiffSynth-Studio ``ImageMetrics`` ``ImageReward/model.safetensors`` hold the same
625 keys (DiffSynth's registry hash reproduces them, clip_family.md E1). Both go through
:func:`imagereward_key_map`: strip ``module.`` and ``blip.``, drop the unused ``vision_proj`` /
``text_proj`` and the ``position_ids`` buffer. That the released ``ImageReward.pt`` holds no keys beyond
those 625 (upstream loads it with ``strict=False``) is unverified; any extra key is reported by name.

Preprocessing: exact path = upstream ``_transform(224)`` (torchvision ``Resize(224, BICUBIC)`` on PIL,
``CenterCrop`` with round-half-even offsets, ``ToTensor``, OpenAI mean/std). Upstream converts to RGB after
the resize, rewardkit (like DiffSynth) before: identical for RGB inputs, slightly different for RGBA.
Tensor path = antialiased bicubic in Pillow's pass order (``rewardkit.preprocess``), differentiable, as
ReFL's ``score_gard`` scoring of decoded latents (ReFL resizes with torchvision's tensor ``Resize``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rewardkit.nets.blip import ImageRewardConfig, ImageRewardNet
from rewardkit.precision import autocast_for, cast_matmul_weights, parse_dtype
from rewardkit.preprocess import PreprocessSpec, preprocess
from rewardkit.protocols import Reward, RewardOutput
from rewardkit.rewards.exact_path import ExactPathMixin
from rewardkit.weights import (
    drop_keys,
    load_state_dict_strict,
    read_state_dict,
    rename_prefixes,
    resolve_weights,
    strip_prefixes,
)

__all__ = ["ImageRewardReward", "load", "load_net", "load_tokenizer", "imagereward_key_map", "IMAGEREWARD_MEAN",
           "IMAGEREWARD_STD", "IMAGEREWARD_MAX_LENGTH", "DEFAULT_WEIGHTS", "DEFAULT_TOKENIZER"]

IMAGEREWARD_MEAN = 0.16717362830052426  # THUDM/ImageReward ImageReward.py: self.mean
IMAGEREWARD_STD = 1.0333394966054072  # THUDM/ImageReward ImageReward.py: self.std
IMAGEREWARD_MAX_LENGTH = 35  # THUDM/ImageReward ImageReward.score: tokenizer(..., max_length=35)
DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"  # BLIP/blip.py init_tokenizer: bos_token and additional special token
DEFAULT_WEIGHTS = "hf:THUDM/ImageReward/ImageReward.pt"  # ImageReward.load("ImageReward-v1.0")
DEFAULT_TOKENIZER = "hf:google-bert/bert-base-uncased"  # BLIP init_tokenizer: 'bert-base-uncased'
WEIGHT_FILES = ("ImageReward.pt", "model.safetensors")  # upstream repo / DiffSynth ImageMetrics folder
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
_TOKENIZER_PATTERNS = ["*.json", "*.txt"]
_UNUSED_KEYS = ("blip.text_encoder.embeddings.position_ids",)  # a buffer: positions are 0..L-1
_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")  # BLIP's contrastive projections


def imagereward_key_map(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream / DiffSynth ImageReward keys -> :class:`rewardkit.nets.blip.ImageRewardNet` keys.

    Raises:
        ValueError: the state dict is not an ImageReward checkpoint (no ``blip.visual_encoder.*`` keys).
    """
    state = strip_prefixes(state, ("module.",))
    if not any(key.startswith("blip.visual_encoder.") for key in state):
        sample = ", ".join(list(state)[:5])
        raise ValueError(f"imagereward: not an ImageReward checkpoint (expected 'blip.visual_encoder.*', "
                         f"'blip.text_encoder.*' and 'mlp.layers.*' keys, found {sample} ...); pass ImageReward.pt "
                         "or DiffSynth's ImageReward/model.safetensors")
    state = drop_keys(state, lambda key: key in _UNUSED_KEYS or key.startswith(_UNUSED_PREFIXES))
    return rename_prefixes(state, [("blip.", "")])


def load_tokenizer(folder: str | Path, **kwargs: Any) -> Any:
    """``BertTokenizer`` from ``folder`` plus ``[DEC]`` and ``[ENC]``, as BLIP's ``init_tokenizer`` builds it."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(folder), **kwargs)
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    return tokenizer


class ImageRewardReward(ExactPathMixin, Reward):
    """ImageReward: a preference score standardised by upstream's mean / std (0 = average), float32 ``(B,)``.

    ``details["raw"]`` is the MLP output before ``(raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD``.
    """

    name = "imagereward"
    higher_is_better = True
    differentiable = True
    requires_prompt = True
    context_keys = frozenset()

    def __init__(self, net: ImageRewardNet, tokenizer: Any, *, max_length: int = IMAGEREWARD_MAX_LENGTH,
                 dtype: Any = None) -> None:
        super().__init__()
        if not 1 < max_length <= net.config.max_positions:
            raise ValueError(f"imagereward: max_length={max_length} must be in [2, {net.config.max_positions}] "
                             "(the text encoder's position embeddings); upstream uses 35")
        if len(tokenizer) > net.config.vocab_size:
            raise ValueError(f"imagereward: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                             f"has {net.config.vocab_size}; pass the tokenizer of these weights (tokenizer=...)")
        self.net = net
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.autocast_dtype = parse_dtype(dtype)
        self.spec = PreprocessSpec(size=net.config.image_size)  # torchvision pipeline, round crop, OpenAI mean/std
        self.freeze()

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``B`` prompts -> ``input_ids`` and ``attention_mask`` ``(B, max_length)`` int64 on the model's device.

        Each distinct prompt is tokenized once per call (GRPO batches repeat every prompt G times).
        """
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(unique, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        row = {prompt: i for i, prompt in enumerate(unique)}
        index = torch.tensor([row[prompt] for prompt in prompts])
        return tokens["input_ids"][index].to(self.device), tokens["attention_mask"][index].to(self.device)

    def raw_scores(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``(B, 3, S, S)`` + tokens -> the MLP output ``(B,)`` in float32 (towers under autocast)."""
        with autocast_for(pixels.device, self.autocast_dtype):
            features = self.net.cls_features(pixels, input_ids, attention_mask)
        x = features.float()
        with torch.autocast(x.device.type, enabled=False):
            for layer in self.net.mlp.layers:  # the Dropout slots are identities in eval mode
                if isinstance(layer, torch.nn.Linear):
                    x = F.linear(x, layer.weight.float(), layer.bias.float())
        return x.squeeze(-1)

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        """Score preprocessed pixels (either path) on the model's device: float32 ``(B,)`` + ``details["raw"]``."""
        input_ids, attention_mask = self.tokenize(prompts)
        raw = self.raw_scores(pixels.to(self.device), input_ids, attention_mask)
        return RewardOutput((raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD, {"raw": raw.detach()})

    def score(self, images: torch.Tensor, prompts: list[str] | None, **context: Any) -> RewardOutput:
        """Tensor path: differentiable resize / crop / normalise, then the towers."""
        out = self.score_pixels(preprocess(images.to(self.device), self.spec), prompts)
        return RewardOutput(out.scores.to(images.device), {k: v.to(images.device) for k, v in out.details.items()})

    def score_gard(self, prompt_ids: torch.Tensor, prompt_attention_mask: torch.Tensor,
                   image: torch.Tensor) -> torch.Tensor:
        """Upstream ``ImageReward.score_gard`` (ReFL): token ids ``(B, L)``, mask ``(B, L)`` and normalised pixels
        ``(B, 3, S, S)`` -> standardised rewards ``(B, 1)``, differentiable w.r.t. ``image``."""
        raw = self.raw_scores(image.to(self.device), prompt_ids.to(self.device), prompt_attention_mask.to(self.device))
        return ((raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD)[:, None]


def _weight_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"imagereward: {path} holds none of {WEIGHT_FILES}; pass the checkpoint file itself")


def _tokenizer_dir(tokenizer: Any, weight_file: Path) -> Path:
    if tokenizer is not None:
        return resolve_weights(tokenizer, allow_patterns=_TOKENIZER_PATTERNS, what="imagereward tokenizer")
    if any((weight_file.parent / name).is_file() for name in TOKENIZER_FILES):
        return weight_file.parent  # DiffSynth's ImageReward/ folder keeps the tokenizer beside the weights
    return resolve_weights(DEFAULT_TOKENIZER, allow_patterns=_TOKENIZER_PATTERNS, what="imagereward tokenizer")


def load_net(weights: Any, config: ImageRewardConfig | dict[str, Any] | None = None) -> ImageRewardNet:
    """Build :class:`ImageRewardNet` for ``config`` (default: ImageReward v1.0) and load ``weights`` strictly."""
    state = read_state_dict(weights, unwrap=("state_dict",))
    with torch.device("meta"):  # no random init of 447M parameters that the checkpoint overwrites
        net = ImageRewardNet(config)
    net = net.to_empty(device="cpu")
    load_state_dict_strict(net, state, name="imagereward", key_map=imagereward_key_map,
                           hint="a checkpoint file carries no architecture: pass config=ImageRewardConfig(...)")
    return net.eval().requires_grad_(False)


def load(weights: Any = None, device: Any = None, dtype: Any = None, *,
         config: ImageRewardConfig | dict[str, Any] | None = None, tokenizer: Any = None,
         max_length: int = IMAGEREWARD_MAX_LENGTH, tokenizer_kwargs: dict[str, Any] | None = None) -> ImageRewardReward:
    """Load ImageReward.

    Args:
        weights: ``ImageReward.pt`` / DiffSynth ``ImageReward/model.safetensors`` (a file, a folder holding one,
            ``hf:`` / ``ms:``); default ``hf:THUDM/ImageReward/ImageReward.pt``.
        device: where the model lives (default CPU).
        dtype: ``None`` (exact fp32) or ``"bf16"`` / ``"fp16"``: the towers' matmul weights held in that dtype
            and run under autocast (norms, embeddings and the MLP head in fp32).
        config: :class:`rewardkit.nets.blip.ImageRewardConfig` (or a dict of its fields) for other sizes.
        tokenizer: a BERT tokenizer folder / spec; default: the one beside the weights, else bert-base-uncased.
        max_length: prompt tokens incl. ``[CLS]`` / ``[SEP]`` (upstream 35).
        tokenizer_kwargs: passed to ``BertTokenizer.from_pretrained``.
    """
    low = parse_dtype(dtype)  # raises on an unknown dtype before any weight is read
    path = resolve_weights(weights or DEFAULT_WEIGHTS, allow_patterns=_TOKENIZER_PATTERNS + list(WEIGHT_FILES),
                           what="imagereward weights")
    weight_file = _weight_file(path)
    net = load_net(weight_file, config)
    tok = load_tokenizer(_tokenizer_dir(tokenizer, weight_file), **(tokenizer_kwargs or {}))
    if low is not None:
        # Fast mode: the ViT's and BERT's Linear / patch Conv weights held in ``low`` once (this net is this
        # reward's own), so autocast does not re-cast every frozen fp32 weight at every call; LayerNorms,
        # embeddings, cls/pos tokens and the MLP head stay float32 (upstream's MLP runs in fp32, see raw_scores).
        cast_matmul_weights(net.visual_encoder, low)
        cast_matmul_weights(net.text_encoder, low)
    reward = ImageRewardReward(net, tok, max_length=max_length, dtype=dtype)
    return reward.to(torch.device("cpu") if device is None else torch.device(device))
