"""The upstream ``image-reward`` package (THUDM/ImageReward 1.5) as a reference, under transformers 5.x.

Used by ``tests/test_imagereward.py`` (parity) and ``benchmarks/bench_imagereward.py`` (speed): one copy.

Install the reference with ``pip install --no-deps image-reward==1.5`` (its pinned dependencies are old;
``timm`` must be importable). Upstream's ``ImageReward.score`` / ``inference_rank`` / ``score_gard`` and
BLIP ``vit.py`` / ``med.py`` then run unchanged. That code was written for transformers 4.x and timm 0.6,
so :func:`upstream_imagereward` bridges exactly what transformers 5.x removed, with what 4.x did:

* ``fairscale``'s ``checkpoint_wrapper`` (``vit.py`` uses it only for gradient checkpointing) is an
  identity, so ``fairscale`` need not be installed;
* ``apply_chunking_to_forward`` / ``prune_linear_layer`` (which ``med.py`` imports from
  ``transformers.modeling_utils``) come from ``transformers.pytorch_utils``; the unused
  ``find_pruneable_heads_and_indices`` is a stub;
* ``BertModel.invert_attention_mask`` is 4.x's ``(1 - mask) * finfo(dtype).min`` and
  ``get_head_mask(None, layers)`` is ``[None] * layers``;
* ``BertModel.init_weights`` is skipped (the checkpoint overwrites every weight);
* ``ImageReward/__init__.py`` and ``ImageReward/models/__init__.py`` are not run (they import the CLIP,
  BLIP-score and aesthetic baselines and ``ReFL``, which need diffusers / clip); only
  ``ImageReward.ImageReward`` and ``ImageReward.models.BLIP`` are imported.

Everything is undone on exit: the patched attributes, the stub modules, every ``ImageReward.*`` module,
the global ``warnings`` filter that ``BLIP/blip.py`` sets to "ignore" and the transformers log level that
``blip_pretrain.py`` sets to "error".

Upstream downloads its ViT-L and the ``bert-base-uncased`` tokenizer. :meth:`UpstreamImageReward.load`
builds them from a local checkpoint instead, at any :class:`rewardkit.nets.blip.ImageRewardConfig` size:
``create_vit`` returns an upstream ``VisionTransformer`` of the config's sizes, ``init_tokenizer`` does
upstream's three calls on the given tokenizer folder (its ``additional_special_tokens_ids`` attribute no
longer exists in 5.x, so ``enc_token_id`` is looked up by token), ``ImageReward.mlp`` is rebuilt as
upstream ``MLP(text_width)`` (upstream hard-codes 768), and the checkpoint loads with ``strict=True``.

A missing ``image-reward`` package raises ``ImportError``: a missing reference is a failure, never a skip.

Example:
    >>> with upstream_imagereward() as upstream:
    ...     model = upstream.load(**rkt.tiny_imagereward(tmp))   # the upstream ImageReward nn.Module
    ...     scores = model.score("a cat", [image_a, image_b])
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from rewardkit.nets.blip import ImageRewardConfig

__all__ = ["upstream_imagereward", "UpstreamImageReward", "upstream_med_config", "write_upstream_med_config",
           "INSTALL_HINT"]

INSTALL_HINT = ("the upstream ImageReward reference is missing: `pip install --no-deps image-reward==1.5` "
                "(the README's test command does this)")
UPSTREAM_IMAGE_SIZE = 224  # ImageReward.__init__: BLIP_Pretrain(image_size=224), _transform(224)
_VIT_DROP_PATH = 0.1  # BLIP/blip.py create_vit('large'): drop_path_rate=0.1 (inactive in eval mode)
_MISSING = object()


class _Patches:
    """Attribute and ``sys.modules`` patches, undone in reverse order by :meth:`undo`."""

    def __init__(self) -> None:
        self._undo: list[Any] = []

    def setattr(self, target: Any, name: str, value: Any) -> None:
        old = target.__dict__.get(name, _MISSING) if isinstance(target, type) else getattr(target, name, _MISSING)
        setattr(target, name, value)
        self._undo.append((target, name, old))

    def module(self, name: str, module: types.ModuleType) -> None:
        self._undo.append((sys.modules, name, sys.modules.get(name, _MISSING)))
        sys.modules[name] = module

    def undo(self) -> None:
        while self._undo:
            target, name, old = self._undo.pop()
            if target is sys.modules:
                if old is _MISSING:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = old
            elif old is _MISSING:
                delattr(target, name)
            else:
                setattr(target, name, old)


def upstream_med_config(config: ImageRewardConfig | dict[str, Any] | None = None) -> dict[str, Any]:
    """BLIP ``med_config.json`` (``ImageReward/models/BLIP/med_config.json``) at ``config``'s text sizes.

    The non-size values are upstream's; ``encoder_width`` is the ViT width (``BLIP_Pretrain`` overwrites it).
    """
    c = ImageRewardConfig.coerce(config)
    return {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": c.text_width, "initializer_range": 0.02,
        "intermediate_size": c.text_intermediate, "layer_norm_eps": 1e-12,
        "max_position_embeddings": c.max_positions, "model_type": "bert",
        "num_attention_heads": c.text_heads, "num_hidden_layers": c.text_layers, "pad_token_id": c.pad_token_id,
        "type_vocab_size": 2, "vocab_size": c.vocab_size, "encoder_width": c.vision_width,
        "add_cross_attention": True,
    }


def write_upstream_med_config(path: str | Path, config: ImageRewardConfig | dict[str, Any] | None = None) -> Path:
    """Write :func:`upstream_med_config` to ``path`` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(upstream_med_config(config), indent=1))
    return path


@dataclass(frozen=True)
class UpstreamImageReward:
    """The imported upstream modules (valid inside :func:`upstream_imagereward` only).

    Attributes:
        package: ``ImageReward.ImageReward`` (``ImageReward``, ``MLP``, ``_transform``).
        blip_pretrain, med, vit: ``ImageReward.models.BLIP.blip_pretrain`` / ``.med`` / ``.vit``.
    """

    package: types.ModuleType
    blip_pretrain: types.ModuleType
    med: types.ModuleType
    vit: types.ModuleType

    def load(self, weights: str | Path, tokenizer: str | Path, config: ImageRewardConfig | dict[str, Any] | None = None,
             med_config: str | Path | None = None, **_: Any) -> torch.nn.Module:
        """Upstream ``ImageReward(med_config, device="cpu")`` at ``config``'s sizes with ``weights`` loaded strictly.

        Args:
            weights: an upstream-layout ``ImageReward.pt`` (a plain state dict with the ``blip.`` / ``mlp.`` keys).
            tokenizer: a BERT tokenizer folder (upstream: ``bert-base-uncased``).
            config: the architecture (default ImageReward v1.0), as for ``rk.load("imagereward", config=...)``.
            med_config: BLIP's ``med_config.json``; default the one beside ``weights``, else one written from
                ``config`` by :func:`upstream_med_config`.
            **_: other ``rk.load`` keyword arguments (ignored), so ``load(**tiny_imagereward(root))`` works.

        Returns:
            the upstream ``ImageReward`` module in eval mode, gradients off, on the CPU.
        """
        from transformers import BertTokenizer

        c = ImageRewardConfig.coerce(config)

        def create_vit(_vit: str, image_size: int, *_args: Any, **_kwargs: Any) -> tuple[torch.nn.Module, int]:
            vit = self.vit.VisionTransformer(img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.vision_width,
                                             depth=c.vision_layers, num_heads=c.vision_heads,
                                             mlp_ratio=c.vision_mlp_ratio, drop_path_rate=_VIT_DROP_PATH)
            return vit, c.vision_width

        def init_tokenizer() -> Any:  # BLIP/blip.py init_tokenizer, from the local folder
            tok = BertTokenizer.from_pretrained(str(tokenizer))
            tok.add_special_tokens({"bos_token": "[DEC]"})
            tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
            tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
            return tok

        beside = Path(weights).parent / "med_config.json"
        patches = _Patches()
        with tempfile.TemporaryDirectory(prefix="rk-med-config-") as tmp:
            if med_config is None:
                med_config = beside if beside.is_file() else write_upstream_med_config(Path(tmp) / "med_config.json", c)
            try:
                patches.setattr(self.blip_pretrain, "create_vit", create_vit)
                patches.setattr(self.blip_pretrain, "init_tokenizer", init_tokenizer)
                model = self.package.ImageReward(med_config=str(med_config), device="cpu")
            finally:
                patches.undo()
        model.mlp = self.package.MLP(c.text_width)
        if c.image_size != UPSTREAM_IMAGE_SIZE:
            model.preprocess = self.package._transform(c.image_size)
        model.load_state_dict(torch.load(str(weights), map_location="cpu", weights_only=True), strict=True)
        return model.eval().requires_grad_(False)


def _invert_attention_mask(self: Any, mask: torch.Tensor) -> torch.Tensor:  # transformers 4.x ModuleUtilsMixin
    return (1.0 - mask[:, None, None, :].to(self.dtype)) * torch.finfo(self.dtype).min


@contextlib.contextmanager
def upstream_imagereward() -> Iterator[UpstreamImageReward]:
    """Import upstream ``ImageReward``'s model code under transformers 5.x (module docstring); undone on exit.

    Raises:
        ImportError: ``image-reward`` is not installed (a missing reference is an error, never a skip).
    """
    import transformers
    import transformers.modeling_utils as modeling_utils
    from transformers import pytorch_utils

    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if _is_upstream_module(n)}  # import afresh
    try:
        spec = importlib.util.find_spec("ImageReward")
    finally:
        sys.modules.update(saved)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(INSTALL_HINT)
    root = Path(spec.submodule_search_locations[0])
    stubs = {name: types.ModuleType(name) for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint")}
    wrapper = types.ModuleType("fairscale.nn.checkpoint.checkpoint_activations")
    wrapper.checkpoint_wrapper = lambda module, **_: module
    stubs[wrapper.__name__] = wrapper
    for name, path in (("ImageReward", root), ("ImageReward.models", root / "models")):  # skip their __init__s
        stubs[name] = types.ModuleType(name)
        stubs[name].__path__ = [str(path)]
    helpers = {"apply_chunking_to_forward": pytorch_utils.apply_chunking_to_forward,
               "prune_linear_layer": pytorch_utils.prune_linear_layer,
               "find_pruneable_heads_and_indices": lambda *args: None}
    verbosity = transformers.logging.get_verbosity()
    patches = _Patches()
    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if _is_upstream_module(n)}  # nested use: restored
    with warnings.catch_warnings():  # BLIP/blip.py: warnings.filterwarnings("ignore") at import
        try:
            for name, module in stubs.items():
                patches.module(name, module)
            for name, helper in helpers.items():
                patches.setattr(modeling_utils, name, helper)
            import ImageReward.ImageReward as package
            from ImageReward.models.BLIP import blip_pretrain, med, vit

            patches.setattr(med.BertModel, "init_weights", lambda self: None)
            patches.setattr(med.BertModel, "get_head_mask", lambda self, mask, layers: [None] * layers)
            patches.setattr(med.BertModel, "invert_attention_mask", _invert_attention_mask)
            yield UpstreamImageReward(package=package, blip_pretrain=blip_pretrain, med=med, vit=vit)
        finally:
            patches.undo()
            for name in [n for n in sys.modules if _is_upstream_module(n)]:
                del sys.modules[name]
            sys.modules.update(saved)
            transformers.logging.set_verbosity(verbosity)


def _is_upstream_module(name: str) -> bool:
    return name == "ImageReward" or name.startswith("ImageReward.")
