"""Checkpoint formats: upstream and DiffSynth-Studio layouts load and agree; bad checkpoints fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.weights import CheckpointMismatchError

PROMPTS = ["a photo of a cat", "a red car", "a bowl of fruit", "an owl"]


@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "hpsv2.1", "aesthetic", "bioclip"])
def test_upstream_and_diffsynth_layouts_give_the_same_scores(name: str, tiny_reward) -> None:
    images = rkt.random_images(4, 40, 36, seed=3)
    prompts = PROMPTS if tiny_reward(name).requires_prompt else None
    upstream = tiny_reward(name, "upstream")(images, prompts)
    diffsynth = tiny_reward(name, "diffsynth")(images, prompts)
    torch.testing.assert_close(upstream, diffsynth, rtol=0, atol=0)


def test_truncated_checkpoint_names_the_file(tmp_path: Path) -> None:
    kwargs = rkt.tiny_hpsv2(tmp_path)
    path = Path(kwargs["weights"])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=path.name):
        rk.load("hpsv2", **kwargs)


def test_architecture_mismatch_lists_shapes_and_points_to_config(tmp_path: Path) -> None:
    kwargs = rkt.tiny_hpsv2(tmp_path)
    with pytest.raises(CheckpointMismatchError, match="config=") as info:
        rk.load("hpsv2", weights=kwargs["weights"])  # the default ViT-H-14 architecture, a tiny file
    assert "shape conflicts" in str(info.value) and "visual.conv1.weight" in str(info.value)


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    kwargs = rkt.tiny_bioclip(tmp_path, layout="diffsynth")
    state = load_file(kwargs["weights"])
    del state["ln_final.weight"]
    state["visual.extra_head.weight"] = torch.zeros(2)
    save_file(state, kwargs["weights"])
    with pytest.raises(CheckpointMismatchError) as info:
        rk.load("bioclip", **kwargs)
    message = str(info.value)
    assert "1 missing" in message and "ln_final.weight" in message
    assert "1 unexpected" in message and "visual.extra_head.weight" in message


def test_checkpoint_of_another_family_is_rejected(tmp_path: Path) -> None:
    hps = rkt.tiny_hpsv2(tmp_path)  # open_clip keys: not a PickScore (HF CLIP) checkpoint
    with pytest.raises(ValueError, match="open_clip keys but no default architecture"):
        rk.load("pickscore", weights=hps["weights"])


def test_not_a_clip_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="not a CLIP checkpoint"):
        rk.load("clip-score", weights=str(path))


def test_folder_without_a_known_layout(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face CLIP folder"):
        rk.load("clip-score", weights=str(tmp_path))


def test_aesthetic_head_with_a_merged_checkpoint_is_ambiguous(tmp_path: Path) -> None:
    kwargs = rkt.tiny_aesthetic(tmp_path, layout="diffsynth")
    with pytest.raises(ValueError, match="do not pass clip_weights"):
        rk.load("aesthetic", weights=kwargs["weights"], clip_weights="hf:openai/clip-vit-large-patch14")


@pytest.mark.parametrize("name", ["clip-score", "pickscore", "hpsv2", "aesthetic", "bioclip"])
def test_default_weights_offline_fail_without_a_download(name: str) -> None:
    # conftest sets HF_HUB_OFFLINE=1 and blocks sockets: the default hub weights must not be fetched.
    with pytest.raises(FileNotFoundError, match="offline"):
        rk.load(name)
