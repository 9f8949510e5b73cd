"""Model sizes and seeded random CLIP checkpoints written in each reward's real format.

Hugging Face folder for pickscore / clip-score / the aesthetic tower + MLP head ``.pth``, HPS
``{"state_dict": ...}`` ``.pt`` for hpsv2, open_clip hub folder for bioclip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rewardkit.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from rewardkit.testing import write_clip_tokenizer

VOCAB_SIZE, CONTEXT_LENGTH = 49408, 77  # CLIP BPE vocabulary and context (openai/CLIP)
ALL_REWARDS = ("pickscore", "hpsv2", "aesthetic", "clip-score", "bioclip")


@dataclass(frozen=True)
class Arch:
    """A CLIP architecture (both towers) for the random checkpoints."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    embed_dim: int

    def describe(self) -> str:
        return (
            f"image {self.image_size}/{self.patch_size}, vision width {self.vision_width} x {self.vision_layers} "
            f"layers ({self.vision_heads} heads), text width {self.text_width} x {self.text_layers} layers "
            f"({self.text_heads} heads), embed {self.embed_dim}"
        )


SIZES = {
    # ViT-B/16 CLIP (openai/clip-vit-base-patch16 shapes): ~150M parameters.
    "vit-b-16": Arch(224, 16, 768, 12, 12, 512, 12, 8, 512),
    # OpenAI ViT-L/14 (openai/clip-vit-large-patch14: the aesthetic predictor's tower): ~430M parameters.
    "vit-l-14": Arch(224, 14, 1024, 24, 16, 768, 12, 12, 768),
    # laion CLIP-ViT-H-14 (PickScore_v1, HPSv2 / v2.1 towers): ~990M parameters.
    "vit-h-14": Arch(224, 14, 1280, 32, 16, 1024, 24, 16, 1024),
    "tiny": Arch(64, 16, 64, 2, 4, 64, 2, 4, 32),  # smoke run: seconds
}


# open_clip stores these as raw (in, out) matrices used as x @ P; everything else 2-D+ is (out, in, ...).
_RAW_PROJECTIONS = ("visual.proj", "text_projection")
_KEEP_INIT = ("token_embedding", "position_embedding", "positional_embedding", "class_embedding")


def spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every matrix as N(0, 1/fan_in), seeded, so that the random towers are input-dependent.

    Library initialisers (std 0.02 and below) give towers whose embeddings barely depend on the input,
    which would make the fidelity numbers (rank correlation in particular) meaningless. Token and
    positional embeddings keep the library initialisation. Timing does not depend on the values.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim < 2 or any(key in name for key in _KEEP_INIT):
                continue
            fan_in = param.shape[0] if name in _RAW_PROJECTIONS else param[0].numel()
            param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)


def hf_clip_config(arch: Arch, hidden_act: str) -> dict[str, Any]:
    """``transformers.CLIPConfig`` kwargs (laion / OpenAI CLIP conventions: legacy EOS-argmax pooling)."""
    text = {
        "hidden_size": arch.text_width, "intermediate_size": 4 * arch.text_width,
        "num_attention_heads": arch.text_heads, "num_hidden_layers": arch.text_layers,
        "max_position_embeddings": CONTEXT_LENGTH, "vocab_size": VOCAB_SIZE, "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }
    vision = {
        "hidden_size": arch.vision_width, "intermediate_size": 4 * arch.vision_width,
        "num_attention_heads": arch.vision_heads, "num_hidden_layers": arch.vision_layers,
        "image_size": arch.image_size, "patch_size": arch.patch_size, "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
    }
    return {"projection_dim": arch.embed_dim, "text_config": text, "vision_config": vision}


def open_clip_config(arch: Arch) -> dict[str, Any]:
    """open_clip model config (exact GELU, as ViT-H-14 / ViT-L-14 json configs)."""
    return {
        "embed_dim": arch.embed_dim,
        "vision_cfg": {"image_size": arch.image_size, "layers": arch.vision_layers, "width": arch.vision_width,
                       "head_width": arch.vision_width // arch.vision_heads, "patch_size": arch.patch_size},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": VOCAB_SIZE, "width": arch.text_width,
                     "heads": arch.text_heads, "layers": arch.text_layers},
    }


def write_hf_folder(folder: Path, arch: Arch, hidden_act: str, seed: int) -> Path:
    """A Hugging Face CLIP folder: config, safetensors weights, CLIP BPE tokenizer, preprocessor config."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**hf_clip_config(arch, hidden_act)))
    spread_weights(model, seed)
    model.save_pretrained(str(folder))
    write_clip_tokenizer(folder)
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True,
        "size": {"shortest_edge": arch.image_size}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": arch.image_size, "width": arch.image_size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1))
    return folder


def random_open_clip_state(arch: Arch, seed: int) -> dict[str, torch.Tensor]:
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**open_clip_config(arch))
    spread_weights(model, seed)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


class UpstreamAestheticMLP(torch.nn.Module):
    """``MLP`` of christophschuhmann/improved-aesthetic-predictor ``simple_inference.py`` (no activations)."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def write_checkpoint(name: str, root: Path, arch: Arch, seed: int) -> dict[str, Any]:
    """Write ``name``'s checkpoint under ``root``; return ``{"rk": rk.load kwargs, "files": paths}``."""
    if name in ("pickscore", "clip-score"):
        act = "gelu" if name == "pickscore" else "quick_gelu"  # PickScore_v1 / laion: gelu; OpenAI: quick_gelu
        folder = write_hf_folder(root / name, arch, act, seed)
        return {"rk": {"weights": str(folder)}, "files": {"folder": folder}}
    if name == "aesthetic":
        folder = write_hf_folder(root / "clip-vit", arch, "quick_gelu", seed)  # OpenAI ViT-L/14 is QuickGELU
        torch.manual_seed(seed + 1)
        head = root / "sac+logos+ava1-l14-linearMSE.pth"
        torch.save(UpstreamAestheticMLP(arch.embed_dim).state_dict(), head)
        return {"rk": {"weights": str(head), "clip_weights": str(folder)}, "files": {"folder": folder, "head": head}}
    if name == "hpsv2":
        path = root / "HPS_v2_compressed.pt"
        root.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": random_open_clip_state(arch, seed)}, path)
        config_file = root / "bench-hps-clip.json"  # for the reference's open_clip.create_model(name)
        config_file.write_text(json.dumps(open_clip_config(arch)))
        return {"rk": {"weights": str(path), "config": open_clip_config(arch)},
                "files": {"checkpoint": path, "config_file": config_file}}
    if name == "bioclip":
        from safetensors.torch import save_file

        folder = root / "bioclip-2"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(random_open_clip_state(arch, seed), str(folder / "open_clip_model.safetensors"))
        preprocess_cfg = {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD),
                          "interpolation": "bicubic", "resize_mode": "shortest"}
        config = {"model_cfg": open_clip_config(arch), "preprocess_cfg": preprocess_cfg}
        (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
        return {"rk": {"weights": str(folder)}, "files": {"folder": folder}}
    raise ValueError(f"unknown reward {name!r}; choose from {ALL_REWARDS}")
