"""``rewardkit verify`` checks of the CLIP family: pickscore, clip-score, hpsv2 / hpsv2.1, bioclip.

Each check resolves the reward's real default weights (or ``weights=`` / ``processor=`` / ``config=`` from
``--set``), scores :func:`~rewardkit.verify_common.reference_pil_images` against
:data:`~rewardkit.verify_common.REFERENCE_PROMPTS` with rewardkit's exact PIL path (``score_pil``), and the same
files with the upstream code:

* ``pickscore``: transformers ``CLIPModel`` + the PIL ``CLIPProcessor``, the yuvalkirstain/PickScore README
  formula ``logit_scale.exp() * cos``;
* ``clip-score``: torchmetrics ``functional.multimodal.clip_score`` per image (``100 * max(cos, 0)``) on the same
  model and the PIL processor; rewardkit runs with ``scale=100``;
* ``hpsv2`` / ``hpsv2.1``: the ``hpsv2`` package's own vendored open_clip (``create_model_and_transforms(...,
  light_augmentation=True)``, its letterbox ``preprocess_val``, ``get_tokenizer``), ``img_score.py``'s
  ``diag(image_features @ text_features.T)``;
* ``bioclip``: open_clip ``create_model_and_transforms("local-dir:...")`` + ``get_tokenizer``,
  ``logit_scale.exp() * cos``.

Tolerances are absolute on each reward's own scale and sit about 5e-5 of its typical magnitude: two float32
runs of the same network in a different batch shape and op order differ by ~1e-6 relative.
"""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from rewardkit.verify_common import REFERENCE_PROMPTS, Check, json_option, max_abs_diff, reference_pil_images, version_of

__all__ = ["CLIP_CHECKS", "PICKSCORE_TOL", "CLIP_SCORE_TOL", "HPS_TOL", "BIOCLIP_TOL"]

PICKSCORE_TOL = 1e-3  # logit_scale (100) x cosine: scores about 18-23
CLIP_SCORE_TOL = 1e-3  # torchmetrics scale, 100 x max(cos, 0): about 15-35
HPS_TOL = 2e-5  # raw cosine: about 0.2-0.35
BIOCLIP_TOL = 1e-3  # logit_scale (100) x cosine


def _folder(spec: Any, default: str, what: str) -> Path:
    from rewardkit.rewards.clip_common import HF_FOLDER_PATTERNS
    from rewardkit.weights import resolve_weights

    return Path(resolve_weights(spec or default, allow_patterns=HF_FOLDER_PATTERNS, what=what))


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput with the projected features in pooler_output; 4.x the tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _hf_processor_folder(options: dict[str, Any], folder: Path, default: str, what: str) -> Path:
    if options.get("processor"):
        return _folder(options["processor"], default, what)
    return folder if (folder / "preprocessor_config.json").is_file() else _folder(None, default, what)


def check_pickscore(options: dict[str, Any]) -> Check:
    from transformers import AutoProcessor, CLIPModel

    import rewardkit as rk
    from rewardkit.rewards.pickscore import DEFAULT_PROCESSOR, DEFAULT_WEIGHTS

    folder = _folder(options.get("weights"), DEFAULT_WEIGHTS, "pickscore")
    processor_folder = _hf_processor_folder(options, folder, DEFAULT_PROCESSOR, "pickscore processor")
    images, prompts = reference_pil_images(), list(REFERENCE_PROMPTS)
    reward = rk.load("pickscore", weights=str(folder), processor=str(processor_folder))
    processor = AutoProcessor.from_pretrained(str(processor_folder), backend="pil")
    model = CLIPModel.from_pretrained(str(folder)).eval()
    with torch.inference_mode():
        ours = reward.score_pil(images, prompts)
        pixels = processor(images=images, return_tensors="pt")
        tokens = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embeds = torch.nn.functional.normalize(_features(model.get_image_features(**pixels)), dim=-1)
        text_embeds = torch.nn.functional.normalize(_features(model.get_text_features(**tokens)), dim=-1)
        theirs = (model.logit_scale.exp() * text_embeds @ image_embeds.T).diagonal()
    diff = max_abs_diff(ours, theirs)
    return Check("pickscore", f"{version_of('transformers')} (PickScore README)", diff, PICKSCORE_TOL,
                 diff <= PICKSCORE_TOL, f"{len(images)} image-prompt pairs ({folder.name}, processor "
                 f"{processor_folder.name}, PIL)")


def check_clip_score(options: dict[str, Any]) -> Check:
    import numpy as np
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    import rewardkit as rk
    from rewardkit.rewards.clip_score import DEFAULT_WEIGHTS

    class FeatureTensorCLIP(CLIPModel):
        """torchmetrics 1.9 calls ``get_image_features(...).norm``: return the tensor, as transformers 4.x did."""

        def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            return _features(super().get_image_features(*args, **kwargs))

        def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            return _features(super().get_text_features(*args, **kwargs))

    folder = _folder(options.get("weights"), DEFAULT_WEIGHTS, "clip-score")
    processor_folder = _hf_processor_folder(options, folder, DEFAULT_WEIGHTS, "clip-score processor")
    images, prompts = reference_pil_images(), list(REFERENCE_PROMPTS)
    reward = rk.load("clip-score", weights=str(folder), processor=str(processor_folder), scale=100)
    model = FeatureTensorCLIP.from_pretrained(str(folder)).eval()
    processor = CLIPProcessor.from_pretrained(str(processor_folder), backend="pil")
    with torch.inference_mode():
        ours = reward.score_pil(images, prompts)
        theirs = torch.stack([
            clip_score(torch.from_numpy(np.array(image)).permute(2, 0, 1), prompt,
                       model_name_or_path=lambda: (model, processor))
            for image, prompt in zip(images, prompts)]).float()
    diff = max_abs_diff(ours, theirs)
    return Check("clip-score", f"{version_of('torchmetrics')} clip_score", diff, CLIP_SCORE_TOL,
                 diff <= CLIP_SCORE_TOL, f"{len(images)} pairs on the torchmetrics scale (100 x max(cos, 0)); "
                 f"{folder.name}, PIL processor (torchmetrics' own default on transformers 5 is the torchvision one)")


@contextlib.contextmanager
def hpsv2_open_clip() -> Iterator[types.ModuleType]:
    """The ``hpsv2`` package's vendored open_clip (``hpsv2.src.open_clip``), importable offline.

    hpsv2 1.2.0 imports ``clint`` (download progress bars only) at package import, and its wheel omits
    ``src/open_clip/bpe_simple_vocab_16e6.txt.gz``, which its tokenizer module reads at import. While the
    block runs, ``clint`` is an empty stand-in and the vendored tokenizer module is open_clip's own (the same
    OpenAI CLIP BPE ``SimpleTokenizer`` of the same vocabulary file). Everything is undone on exit.
    """
    import open_clip.tokenizer

    stand_ins = {"clint": types.ModuleType("clint"), "clint.textui": types.ModuleType("clint.textui"),
                 "hpsv2.src.open_clip.tokenizer": open_clip.tokenizer}
    stand_ins["clint.textui"].progress = None  # type: ignore[attr-defined]
    saved = {name: sys.modules.get(name) for name in stand_ins}
    before = set(sys.modules)
    try:
        for name, module in stand_ins.items():
            sys.modules.setdefault(name, module)
        import hpsv2.src.open_clip as vendored

        yield vendored
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("hpsv2"):
                del sys.modules[name]
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _check_hps(name: str, default_weights: str, options: dict[str, Any]) -> Check:
    import rewardkit as rk
    from rewardkit.rewards.hps import HPS_ARCHITECTURE
    from rewardkit.weights import resolve_weights

    upstream = f"{version_of('hpsv2')} (its vendored open_clip, img_score.py)"  # before any download
    path = Path(resolve_weights(options.get("weights") or default_weights, what=name))
    config = json_option(options.get("config"))  # an open_clip model config: a dict, or a JSON file
    images, prompts = reference_pil_images(), list(REFERENCE_PROMPTS)
    reward = rk.load(name, weights=str(path), config=config)
    with hpsv2_open_clip() as vendored, torch.inference_mode():
        architecture = HPS_ARCHITECTURE
        if config is not None:  # registered the way open_clip's add_model_config reads a config file
            architecture = "rk-verify-hps"
            vendored.factory._MODEL_CONFIGS[architecture] = config
        try:  # img_score.initialize_model's arguments, with pretrained=None: the HPS state dict replaces them all
            model, _, preprocess_val = vendored.create_model_and_transforms(
                architecture, None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False,
                force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
                image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
                with_score_predictor=False, with_region_predictor=False)
            tokenizer = vendored.get_tokenizer(architecture)
        finally:
            vendored.factory._MODEL_CONFIGS.pop("rk-verify-hps", None)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
        model.eval()
        rows = []
        for image, prompt in zip(images, prompts):  # img_score.score: one image at a time
            outputs = model(preprocess_val(image)[None], tokenizer([prompt]))
            rows.append((outputs["image_features"] @ outputs["text_features"].T).diagonal()[0])
        theirs = torch.stack(rows)
        ours = reward.score_pil(images, prompts)
    diff = max_abs_diff(ours, theirs)
    return Check(name, upstream, diff, HPS_TOL,
                 diff <= HPS_TOL, f"{len(images)} image-prompt pairs ({path.name}, letterbox preprocess_val)")


def check_hpsv2(options: dict[str, Any]) -> Check:
    from rewardkit.rewards.hps import WEIGHTS_V2

    return _check_hps("hpsv2", WEIGHTS_V2, options)


def check_hpsv21(options: dict[str, Any]) -> Check:
    from rewardkit.rewards.hps import WEIGHTS_V21

    return _check_hps("hpsv2.1", WEIGHTS_V21, options)


def check_bioclip(options: dict[str, Any]) -> Check:
    import open_clip

    import rewardkit as rk
    from rewardkit.rewards.bioclip import DEFAULT_WEIGHTS
    from rewardkit.rewards.clip_loading import OPEN_CLIP_FOLDER_PATTERNS
    from rewardkit.weights import resolve_weights

    folder = Path(resolve_weights(options.get("weights") or DEFAULT_WEIGHTS,
                                  allow_patterns=OPEN_CLIP_FOLDER_PATTERNS, what="bioclip"))
    images, prompts = reference_pil_images(), list(REFERENCE_PROMPTS)
    reward = rk.load("bioclip", weights=str(folder))
    model, _, preprocess_val = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    with torch.inference_mode():
        ours = reward.score_pil(images, prompts)
        image_embeds = torch.nn.functional.normalize(
            model.encode_image(torch.stack([preprocess_val(image) for image in images])), dim=-1)
        text_embeds = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
        theirs = model.logit_scale.exp() * (image_embeds * text_embeds).sum(-1)
    diff = max_abs_diff(ours, theirs)
    return Check("bioclip", f"{version_of('open_clip_torch')} local-dir", diff, BIOCLIP_TOL, diff <= BIOCLIP_TOL,
                 f"{len(images)} image-prompt pairs ({folder.name})")


CLIP_CHECKS: dict[str, Callable[[dict[str, Any]], Check]] = {
    "pickscore": check_pickscore, "clip-score": check_clip_score, "hpsv2": check_hpsv2, "hpsv2.1": check_hpsv21,
    "bioclip": check_bioclip,
}
