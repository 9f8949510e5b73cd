"""Seeded sample images for the tests, as PIL images (the exact, PIL-input paths of the rewards).

Test files import it as ``from image_samples import ...``: ``tests/`` has no ``__init__.py``, so pytest's default
("prepend") import mode puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

import rewardkit.testing as rkt


def random_pil_images(sizes: Sequence[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """One RGB image per ``(width, height)`` in ``sizes``: ``rkt.random_images`` with seed ``seed + index``,
    scaled to [0, 255] and rounded to uint8."""
    images = []
    for index, (width, height) in enumerate(sizes):
        array = (rkt.random_images(1, height, width, seed=seed + index)[0].permute(1, 2, 0).numpy() * 255).round()
        images.append(Image.fromarray(array.astype(np.uint8), "RGB"))
    return images
