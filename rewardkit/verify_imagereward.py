"""``rewardkit verify imagereward``: rewardkit's ImageReward against the ``image-reward`` package's own code.

The upstream side is THUDM/ImageReward 1.5's ``ImageReward.score(prompt, image)`` (its BLIP ``vit.py`` /
``med.py``, its ``_transform``, its tokenizer calls) run through ``rewardkit.testing.imagereward_upstream``,
which bridges only what transformers 5 removed (see that module) and builds the model from the same local
files instead of downloading them. Install the reference with ``pip install --no-deps image-reward==1.5``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rewardkit.verify_common import REFERENCE_PROMPTS, Check, json_option, max_abs_diff, reference_pil_images, version_of

__all__ = ["check_imagereward", "IMAGEREWARD_TOL"]

IMAGEREWARD_TOL = 1e-4  # standardised scores, about -2.5..2.5


def check_imagereward(options: dict[str, Any]) -> Check:
    """Score the reference images with rewardkit (exact PIL path) and with upstream ``ImageReward.score``.

    Options: ``weights`` (``ImageReward.pt``; default ``hf:THUDM/ImageReward/ImageReward.pt``), ``tokenizer``
    (a BERT tokenizer folder; default the one beside the weights, else bert-base-uncased), ``config``
    (:class:`rewardkit.nets.blip.ImageRewardConfig` fields, a dict or a JSON file, for other sizes),
    ``med_config`` (BLIP's ``med_config.json``; default the one beside the weights, else ImageReward v1.0's).
    """
    import rewardkit as rk
    from rewardkit.rewards.imagereward import DEFAULT_WEIGHTS, WEIGHT_FILES, _TOKENIZER_PATTERNS, _tokenizer_dir
    from rewardkit.rewards.imagereward import _weight_file
    from rewardkit.testing.imagereward_upstream import upstream_imagereward
    from rewardkit.weights import resolve_weights

    version = version_of("image-reward")  # before any download: a missing reference is said at once
    path = resolve_weights(options.get("weights") or DEFAULT_WEIGHTS,
                           allow_patterns=_TOKENIZER_PATTERNS + list(WEIGHT_FILES), what="imagereward weights")
    weight_file = _weight_file(Path(path))
    tokenizer = _tokenizer_dir(options.get("tokenizer"), weight_file)
    config = json_option(options.get("config"))
    images, prompts = reference_pil_images(), list(REFERENCE_PROMPTS)
    reward = rk.load("imagereward", weights=str(weight_file), tokenizer=str(tokenizer), config=config)
    with upstream_imagereward() as upstream, torch.inference_mode():
        model = upstream.load(weights=weight_file, tokenizer=tokenizer, config=config,
                              med_config=options.get("med_config"))
        theirs = torch.tensor([float(model.score(prompt, image)) for prompt, image in zip(prompts, images)])
    with torch.inference_mode():
        ours = reward.score_pil(images, prompts)
    diff = max_abs_diff(ours, theirs)
    return Check("imagereward", f"{version} ImageReward.score", diff, IMAGEREWARD_TOL, diff <= IMAGEREWARD_TOL,
                 f"{len(images)} image-prompt pairs ({weight_file.name}, tokenizer {tokenizer.name})")
