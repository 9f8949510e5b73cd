"""Speed of rewardkit's CLIP-family rewards against the reference computation, on the same weights, on CPU.

For each reward a seeded random checkpoint of the chosen size is written in the reward's real format
(Hugging Face folder for pickscore / clip-score / the aesthetic tower + MLP head ``.pth``, HPS
``{"state_dict": ...}`` ``.pt`` for hpsv2, open_clip hub folder for bioclip). rewardkit loads it with
``rk.load`` (exact fp32 and ``dtype="bf16"``); the reference loads the same files with the upstream
libraries, the way the upstream projects call them:

* pickscore, clip-score: ``CLIPModel.from_pretrained`` + ``CLIPProcessor`` (PIL backend, which is what
  rewardkit's exact path reproduces), ``get_image_features`` / ``get_text_features``, ``x / x.norm()``,
  ``logit_scale.exp() * cos`` (PickScore README) or ``2.5 * max(cos, 0)`` (CLIPScore);
* hpsv2: open_clip model + ``load_state_dict(checkpoint["state_dict"])``, the HPSv2 letterbox
  transform (written below from ``hpsv2/src/open_clip/transform.py``), open_clip tokenizer,
  ``diag(image_features @ text_features.T)``; batched (upstream ``hpsv2.score`` loops batch 1);
* aesthetic: ``CLIPModel.from_pretrained`` image features + OpenAI ``clip.load`` preprocessing
  (torchvision on PIL) + numpy L2 normalisation + the ``simple_inference.py`` MLP;
* bioclip: ``open_clip.create_model_and_transforms("local-dir:...")`` + its ``preprocess_val`` +
  ``open_clip.get_tokenizer``, ``logit_scale.exp() * cos``.

Input: a GRPO-shaped batch, 8 distinct prompts x 4 images, 512x512 smooth random RGB images (uint8 PIL
for the reference and rewardkit's exact path; the same pixels / 255 as a float tensor for the tensor
path). Timed under ``torch.inference_mode()``, after one warm-up call, median of ``--repeats``; modes
are interleaved within each repeat so that a change of machine load hits all of them alike. rewardkit
caches text embeddings across calls: "cold" rows clear ``reward.prompt_cache`` before every timed call,
"warm" rows keep it (an RL-loop advantage, labelled as such).

Usage:
    .venv/bin/python benchmarks/bench_clip_rewards.py --size tiny --repeats 2 --out /tmp/smoke.md
    .venv/bin/python benchmarks/bench_clip_rewards.py --rewards pickscore hpsv2 aesthetic --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import rewardkit as rk  # noqa: E402
from rewardkit.errors import check_images  # noqa: E402
from rewardkit.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess, preprocess_pil  # noqa: E402
from rewardkit.testing import write_clip_tokenizer  # noqa: E402

GROUPS, GROUP_SIZE, IMAGE_SIDE = 8, 4, 512  # GRPO batch: 8 prompts x 4 images, 512 px
PROMPTS = (
    "a red fox sitting in a snowy forest at dawn, highly detailed",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen with a soft-boiled egg, studio photograph",
    "a watercolor painting of a lighthouse on a cliff during a storm",
    "a futuristic city skyline at night with neon signs and flying cars",
    "a close-up portrait of an old fisherman, dramatic lighting",
    "a cozy reading nook with a cat sleeping on a pile of books",
    "a low-poly 3d render of a mountain landscape with a river",
)
VOCAB_SIZE, CONTEXT_LENGTH = 49408, 77  # CLIP BPE vocabulary and context (openai/CLIP)
CLIPSCORE_W = 2.5  # Hessel et al. 2021, eq. 1
ALL_REWARDS = ("pickscore", "hpsv2", "aesthetic", "clip-score", "bioclip")
DEFAULT_REWARDS = ("pickscore", "hpsv2", "aesthetic")


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
    "tiny": Arch(64, 16, 64, 2, 4, 64, 2, 4, 32),  # smoke run: seconds
}


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------
def make_images(count: int, side: int, seed: int) -> list[Image.Image]:
    """Smooth random RGB images: coarse and medium bicubic-upsampled noise plus a random oriented wave."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64) / side
    images = []
    for _ in range(count):
        layers = []
        for cells in (6, 40):
            grid = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
            up = Image.fromarray(grid).resize((side, side), Image.Resampling.BICUBIC)
            layers.append(np.asarray(up, dtype=np.float64) / 255.0)
        angle, freq = rng.uniform(0, np.pi), rng.uniform(2.0, 12.0)
        phase = rng.uniform(0, 2 * np.pi, 3)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle))[..., None] + phase)
        mixed = 0.55 * layers[0] + 0.2 * layers[1] + 0.25 * wave
        images.append(Image.fromarray(np.clip(np.round(mixed * 255.0), 0, 255).astype(np.uint8), mode="RGB"))
    return images


def to_float_tensor(images: list[Image.Image]) -> torch.Tensor:
    """The same pixels as float ``(B, 3, H, W)`` in [0, 1] (what a diffusers pipeline returns)."""
    array = np.stack([np.asarray(image) for image in images])  # (B, H, W, 3) uint8
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().float().div_(255.0)


# ---------------------------------------------------------------------------------------------------
# Random checkpoints in the real formats
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# Reference computations (upstream libraries, upstream call patterns)
# ---------------------------------------------------------------------------------------------------
def pooled_features(output: Any) -> torch.Tensor:
    """transformers 4.x returns a tensor from get_*_features, 5.x a ModelOutput whose pooler_output is it."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class Reference:
    """``preprocess(pil) -> pixels``, ``image_features``, ``text_features``, ``score``; ``__call__`` chains them."""

    def preprocess(self, images: list[Image.Image]) -> Any:
        raise NotImplementedError

    def image_features(self, pixels: Any) -> torch.Tensor:
        raise NotImplementedError

    def text_features(self, prompts: list[str]) -> torch.Tensor | None:
        return None

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return self.score(self.image_features(self.preprocess(images)), self.text_features(prompts))


class HFClipReference(Reference):
    """PickScore README ``calc_probs`` flow (pickscore) / CLIPScore on HF CLIP (clip-score), pairwise."""

    def __init__(self, folder: Path, kind: str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        # backend="pil": the PIL CLIPImageProcessor (transformers 4.x default) that PickScore was evaluated
        # with; transformers 5.x defaults to a torchvision backend about one gray level away from it.
        self.processor = CLIPProcessor.from_pretrained(str(folder), backend="pil")
        self.model = CLIPModel.from_pretrained(str(folder)).eval()
        self.kind = kind

    def preprocess(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        return self.processor(images=images, padding=True, truncation=True, max_length=CONTEXT_LENGTH,
                              return_tensors="pt")

    def image_features(self, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        embeds = pooled_features(self.model.get_image_features(**pixels))
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=prompts, padding=True, truncation=True, max_length=CONTEXT_LENGTH,
                                return_tensors="pt")
        embeds = pooled_features(self.model.get_text_features(**tokens))
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor | None) -> torch.Tensor:
        cosine = torch.diagonal(text_features @ image_features.T)
        if self.kind == "pickscore":
            return self.model.logit_scale.exp() * cosine
        return CLIPSCORE_W * torch.clamp(cosine, min=0.0)


class HPSResizeMaxSize(torch.nn.Module):
    """HPSv2 ``ResizeMaxSize`` (hpsv2/src/open_clip/transform.py) on a CHW float tensor."""

    def __init__(self, max_size: int, fill: float = 0) -> None:
        super().__init__()
        self.max_size = max_size
        self.fill = fill

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        height, width = img.shape[1:]
        scale = self.max_size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            img = TF.resize(img, new_size, InterpolationMode.BICUBIC)
            pad_h, pad_w = self.max_size - new_size[0], self.max_size - new_size[1]
            img = TF.pad(img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2],
                         fill=self.fill)
        return img


def _convert_to_rgb_or_rgba(image: Image.Image) -> Image.Image:  # HPSv2 transform.py
    return image if image.mode == "RGBA" else image.convert("RGB")


class HPSReference(Reference):
    """``hpsv2.score`` computation (img_score.py), batched: open_clip model, letterbox, raw cosine."""

    def __init__(self, checkpoint: Path, config_file: Path) -> None:
        import open_clip
        from torchvision.transforms import Compose, Normalize, ToTensor

        open_clip.add_model_config(config_file)
        model_name = config_file.stem
        logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights loaded": loaded just below
        self.model = open_clip.create_model(model_name, pretrained=None, output_dict=True)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["state_dict"])
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = self.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.transform = Compose([_convert_to_rgb_or_rgba, ToTensor(), HPSResizeMaxSize(int(size)),
                                  Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        # As upstream: one model(image, text) call, features normalised inside open_clip.
        outputs = self.model(self.preprocess(images), self.tokenizer(prompts))
        return torch.diagonal(outputs["image_features"] @ outputs["text_features"].T)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=True)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts), normalize=True)

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor | None) -> torch.Tensor:
        return torch.diagonal(image_features @ text_features.T)


class AestheticReference(Reference):
    """improved-aesthetic-predictor ``simple_inference.py`` on HF CLIP: clip.load transform, numpy norm, MLP."""

    def __init__(self, folder: Path, head: Path) -> None:
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
        from transformers import CLIPModel

        self.model = CLIPModel.from_pretrained(str(folder)).eval()
        size = self.model.config.vision_config.image_size
        self.mlp = UpstreamAestheticMLP(self.model.config.projection_dim)
        self.mlp.load_state_dict(torch.load(head, map_location="cpu", weights_only=True))
        self.mlp.eval()
        # openai/CLIP clip.py _transform(n_px)
        self.transform = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                                  lambda image: image.convert("RGB"), ToTensor(),
                                  Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.model.get_image_features(pixel_values=pixels))

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor | None) -> torch.Tensor:
        array = image_features.cpu().numpy()
        norm = np.atleast_1d(np.linalg.norm(array, 2, -1))  # simple_inference.py normalized()
        norm[norm == 0] = 1
        embeds = array / np.expand_dims(norm, -1)
        return self.mlp(torch.from_numpy(embeds).float()).squeeze(-1)


class BioCLIPReference(Reference):
    """open_clip hub-folder loading (``create_model_and_transforms``), pybioclip-style logits, pairwise."""

    def __init__(self, folder: Path) -> None:
        import open_clip

        model_id = f"local-dir:{folder}"
        self.model, _, self.transform = open_clip.create_model_and_transforms(model_id)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_id)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels), dim=-1)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(prompts)), dim=-1)

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor | None) -> torch.Tensor:
        return self.model.logit_scale.exp() * torch.diagonal(image_features @ text_features.T)


def build_reference(name: str, files: dict[str, Path]) -> Reference:
    if name in ("pickscore", "clip-score"):
        return HFClipReference(files["folder"], name)
    if name == "hpsv2":
        return HPSReference(files["checkpoint"], files["config_file"])
    if name == "aesthetic":
        return AestheticReference(files["folder"], files["head"])
    return BioCLIPReference(files["folder"])


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------
class CpuContention:
    """CPU time used by *other* processes while a block runs, in cores (from /proc/stat)."""

    def __enter__(self) -> CpuContention:
        self._busy0, self._self0, self._wall0 = _system_busy_s(), _self_cpu_s(), time.perf_counter()
        self.other_cores = float("nan")
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = time.perf_counter() - self._wall0
        busy, own = _system_busy_s() - self._busy0, _self_cpu_s() - self._self0
        if wall > 0 and busy == busy:
            self.other_cores = max(0.0, (busy - own) / wall)


def _system_busy_s() -> float:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Mode:
    key: str
    label: str
    run: Callable[[], Any]
    setup: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)
    scores: np.ndarray | None = None


def as_numpy(scores: Any) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        return scores.detach().float().cpu().numpy().astype(np.float64)
    return np.asarray(scores, dtype=np.float64)


def time_modes(modes: list[Mode], repeats: int) -> None:
    """One warm-up call per mode (its scores are kept), then ``repeats`` interleaved rounds."""
    with torch.inference_mode():
        for mode in modes:
            mode.setup()
            mode.scores = as_numpy(mode.run())
        for _ in range(repeats):
            for mode in modes:
                mode.setup()
                start = time.perf_counter()
                mode.run()
                mode.times.append(time.perf_counter() - start)


def median_s(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------------
# One reward
# ---------------------------------------------------------------------------------------------------
def bench_reward(name: str, arch: Arch, args: argparse.Namespace, pil_images, tensor_images, prompts) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"rk-bench-{name}-") as tmp:
        checkpoint = write_checkpoint(name, Path(tmp), arch, seed=args.seed + ALL_REWARDS.index(name))
        reference = build_reference(name, checkpoint["files"])
        exact = rk.load(name, **checkpoint["rk"])
        fast = rk.load(name, dtype="bf16", **checkpoint["rk"])
        uses_prompts = exact.requires_prompt
        call_prompts = prompts if uses_prompts else None

        def cold(reward):
            return reward.prompt_cache.clear

        def warm(reward):
            def fill() -> None:  # untimed: make sure every prompt is cached (inference mode is active)
                reward.text_embeds(list(dict.fromkeys(prompts)))
            return fill

        modes = [
            Mode("reference", "reference (upstream, PIL input)", lambda: reference(pil_images, prompts)),
            Mode("exact_pil", "rewardkit exact, PIL path (evaluate_pil)",
                 lambda: exact.evaluate_pil(pil_images, call_prompts).scores, cold(exact)),
            Mode("exact_tensor", "rewardkit exact, tensor path",
                 lambda: exact(tensor_images, call_prompts), cold(exact)),
            Mode("fast_tensor", "rewardkit fast (bf16 autocast), tensor path",
                 lambda: fast(tensor_images, call_prompts), cold(fast)),
        ]
        if uses_prompts:
            modes.append(Mode("exact_tensor_warm", "rewardkit exact, tensor path, warm prompt cache",
                              lambda: exact(tensor_images, call_prompts), warm(exact)))
        load_before = os.getloadavg()
        with CpuContention() as contention:
            time_modes(modes, args.repeats)
        result = {"name": name, "modes": modes, "uses_prompts": uses_prompts, "load_before": load_before,
                  "load_after": os.getloadavg(), "other_cores": contention.other_cores, "fidelity": fidelity(modes)}
        if args.breakdown:
            result["breakdown"] = breakdown(reference, exact, fast, pil_images, tensor_images, prompts,
                                            uses_prompts, args.repeats)
        del reference, exact, fast
        gc.collect()
    return result


def fidelity(modes: list[Mode]) -> dict[str, float]:
    from scipy.stats import spearmanr

    scores = {mode.key: mode.scores for mode in modes}
    ref, pil, tensor, fast = scores["reference"], scores["exact_pil"], scores["exact_tensor"], scores["fast_tensor"]
    delta = np.abs(fast - tensor)
    return {
        "exact_pil_vs_ref_max": float(np.max(np.abs(pil - ref))),
        "tensor_vs_pil_max": float(np.max(np.abs(tensor - pil))),
        "fast_vs_exact_max": float(np.max(delta)),
        "fast_vs_exact_mean": float(np.mean(delta)),
        "fast_vs_exact_spearman": float(spearmanr(fast, tensor).statistic),
        "exact_std": float(np.std(tensor)),
        "exact_mean": float(np.mean(tensor)),
    }


def breakdown(reference, exact, fast, pil_images, tensor_images, prompts, uses_prompts, repeats) -> dict:
    """Median seconds of each stage, reference vs rewardkit, on identical inputs per stage."""
    unique = list(dict.fromkeys(prompts))
    with torch.inference_mode():
        ref_pixels = reference.preprocess(pil_images)
        rk_pixels = preprocess_pil(pil_images, exact.spec)
        stages = {
            "preprocess: reference": lambda: reference.preprocess(pil_images),
            "preprocess: rewardkit exact (PIL)": lambda: preprocess_pil(pil_images, exact.spec),
            "input check: rewardkit tensor (check_images)": lambda: check_images(exact.name, tensor_images),
            "preprocess: rewardkit tensor": lambda: preprocess(tensor_images, exact.spec),
            "image tower: reference": lambda: reference.image_features(ref_pixels),
            "image tower: rewardkit exact": lambda: exact.image_embeds(rk_pixels),
            "image tower: rewardkit fast (bf16)": lambda: fast.image_embeds(rk_pixels),
        }
        if uses_prompts:
            stages.update({
                f"text tower: reference ({len(prompts)} prompts)": lambda: reference.text_features(prompts),
                f"text tower: rewardkit exact ({len(unique)} distinct)": lambda: exact.towers.encode_text(unique),
            })
        result = {}
        for label, fn in stages.items():
            fn()  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            result[label] = median_s(times)
    return result


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def machine_description(threads: int) -> list[str]:
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    bf16 = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags] or ["none"]
    import open_clip
    import transformers

    return [
        f"- CPU: {model}, {os.cpu_count()} logical CPUs; bf16-relevant ISA flags: {', '.join(bf16)}; "
        f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}; native bf16 matmul (oneDNN): "
        f"{'yes' if native_bf16() else 'NO'}",
        f"- torch {torch.__version__} ({threads} threads), transformers {transformers.__version__}, "
        f"open_clip {open_clip.__version__}, Python {platform.python_version()}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
    ]


def native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels here (AVX512-BF16 / AMX); without them bf16 GEMMs are emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_note(results: list[dict]) -> list[str]:
    """A warning paragraph when bf16 autocast cannot be fast on this CPU, with the measured slowdown."""
    if native_bf16():
        return []
    slowdowns = [
        median_s(modes["fast_tensor"].times) / median_s(modes["exact_tensor"].times)
        for modes in ({mode.key: mode for mode in result["modes"]} for result in results)
    ]
    return [
        "**This CPU has no native bf16 matmul (no AVX512-BF16 / AMX).** Under bf16 autocast every linear "
        "layer runs a bf16 GEMM without hardware support and the patch-embedding convolution leaves oneDNN, "
        f"so here the fast mode ran {min(slowdowns):.1f}-{max(slowdowns):.1f}x *slower* than exact. Its "
        "fidelity numbers still hold; its speed-up needs AVX512-BF16 / AMX or a GPU.",
        "",
    ]


def fmt_delta(value: float) -> str:
    return f"{value:.2e}"


def speed_table(results: list[dict]) -> list[str]:
    batch = GROUPS * GROUP_SIZE
    lines = ["| reward | mode | s / batch (median) | min - max | images / s | x ref |", "|---|---|---:|---:|---:|---:|"]
    for result in results:
        modes = result["modes"]
        ref_time = median_s(modes[0].times)
        for mode in modes:
            t = median_s(mode.times)
            cold_row = result["uses_prompts"] and mode.key != "reference" and "warm" not in mode.key
            label = f"{mode.label}, cold" if cold_row else mode.label
            lines.append(
                f"| {result['name']} | {label} | {t:.3f} | {min(mode.times):.3f} - {max(mode.times):.3f} | "
                f"{batch / t:.2f} | {ref_time / t:.2f} |"
            )
    return lines


def render(results: list[dict], args: argparse.Namespace, arch: Arch, header: list[str]) -> str:
    batch = GROUPS * GROUP_SIZE
    lines = [
        "# CLIP-family rewards: rewardkit vs reference (CPU)",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        "",
        *header,
        f"- model size `{args.size}`: {arch.describe()} (seeded random weights in each reward's real format)",
        f"- batch: {GROUPS} prompts x {GROUP_SIZE} images = {batch} images of {IMAGE_SIDE}x{IMAGE_SIDE}; "
        f"median of {args.repeats} interleaved repeats after one warm-up, under torch.inference_mode()",
        "",
        "## Speed",
        "",
        "x ref = reference time / mode time (> 1: rewardkit is faster). \"cold\" = prompt cache cleared before "
        "every call (fair comparison); \"warm\" = prompts already cached, as in an RL loop that re-scores "
        "the same prompt set (not a like-for-like comparison).",
        "",
        *bf16_note(results),
        *speed_table(results),
    ]
    lines += [
        "",
        "## Fidelity",
        "",
        "Scores on the benchmark batch. exact PIL vs ref: rewardkit's exact path against the reference "
        "(same preprocessing semantics). tensor vs PIL: the documented gap of the differentiable tensor "
        "preprocessing. fast vs exact: bf16 autocast against fp32, both on the tensor path; Spearman rank "
        "correlation over the 32 scores. Score std: spread of the exact scores, to read |delta| against.",
        "",
        "| reward | exact PIL vs ref max abs delta | tensor vs PIL max abs delta | fast vs exact max abs delta "
        "| fast vs exact mean abs delta | fast vs exact Spearman | exact score mean / std |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        fid = result["fidelity"]
        lines.append(
            f"| {result['name']} | {fmt_delta(fid['exact_pil_vs_ref_max'])} | {fmt_delta(fid['tensor_vs_pil_max'])} "
            f"| {fmt_delta(fid['fast_vs_exact_max'])} | {fmt_delta(fid['fast_vs_exact_mean'])} "
            f"| {fid['fast_vs_exact_spearman']:.4f} | {fid['exact_mean']:.4g} / {fid['exact_std']:.3g} |"
        )
    lines += [
        "",
        "## Machine load during the timing",
        "",
        "Other processes' CPU use (cores, averaged over each reward's timing loop, from /proc/stat) and the "
        "1-minute load average before / after. On this machine anything above ~0.2 cores of foreign load "
        "inflates the absolute times; the interleaved ratios are less affected.",
        "",
        "| reward | other processes (cores) | loadavg 1 min before / after |",
        "|---|---:|---:|",
    ]
    for result in results:
        lines.append(f"| {result['name']} | {result['other_cores']:.2f} | "
                     f"{result['load_before'][0]:.2f} / {result['load_after'][0]:.2f} |")
    if any("breakdown" in r for r in results):
        lines += ["", "## Stage breakdown (median seconds for the whole batch)", "",
                  "| reward | stage | s |", "|---|---|---:|"]
        for result in results:
            for label, seconds in result.get("breakdown", {}).items():
                lines.append(f"| {result['name']} | {label} | {seconds:.4f} |")
    lines += [
        "",
        "References: pickscore / clip-score = `CLIPModel.from_pretrained` + `CLIPProcessor(backend=\"pil\")`; "
        "hpsv2 = open_clip model + HPSv2 letterbox transform + open_clip tokenizer, batched (upstream "
        "`hpsv2.score` scores one image per forward); aesthetic = HF CLIP image features + OpenAI "
        "`clip.load` transform + numpy L2 norm + MLP; bioclip = `open_clip.create_model_and_transforms("
        "'local-dir:...')`. The reference encodes all 32 prompts (no de-duplication), as upstream code does.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewards", nargs="+", default=list(DEFAULT_REWARDS), choices=ALL_REWARDS)
    parser.add_argument("--size", default="vit-b-16", choices=sorted(SIZES),
                        help="random checkpoint size (default: ViT-B/16-like; 'tiny' for a smoke run)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per mode (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "clip_rewards.md")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time preprocessing / image tower / text tower separately")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("REWARDKIT_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    arch = SIZES[args.size]
    pil_images = make_images(GROUPS * GROUP_SIZE, IMAGE_SIDE, seed=args.seed)
    tensor_images = to_float_tensor(pil_images)
    prompts = [prompt for prompt in PROMPTS[:GROUPS] for _ in range(GROUP_SIZE)]
    header = machine_description(args.threads)
    print("\n".join(header), flush=True)
    results = []
    for name in args.rewards:
        start = time.perf_counter()
        results.append(bench_reward(name, arch, args, pil_images, tensor_images, prompts))
        print(f"[{name}] done in {time.perf_counter() - start:.0f} s "
              f"(other processes: {results[-1]['other_cores']:.2f} cores)", flush=True)
        print("\n".join(speed_table(results[-1:])), flush=True)
        report = write_report(results, args, arch, header)  # after every reward: a long run keeps its part
    print(report)
    print(f"written to {args.out} and {args.out.with_suffix('.json')}")


def write_report(results: list[dict], args: argparse.Namespace, arch: Arch, header: list[str]) -> str:
    report = render(results, args, arch, header)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    args.out.with_suffix(".json").write_text(json.dumps(raw_results(results, args), indent=1))
    return report


def raw_results(results: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """Every timing (seconds) and score, for re-analysis without re-running."""
    return {
        "argv": sys.argv, "size": args.size, "threads": args.threads, "repeats": args.repeats,
        "rewards": {
            result["name"]: {
                "times_s": {mode.key: mode.times for mode in result["modes"]},
                "scores": {mode.key: mode.scores.tolist() for mode in result["modes"]},
                "fidelity": result["fidelity"], "other_cores": result["other_cores"],
                "loadavg_before": result["load_before"], "loadavg_after": result["load_after"],
                "breakdown_s": result.get("breakdown"),
            }
            for result in results
        },
    }


if __name__ == "__main__":
    main()
