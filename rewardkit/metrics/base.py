"""Shared machinery of the distribution metrics: image sources -> prepared batches -> features -> state.

``FeatureMetric.update(images, real=...)`` accepts what users have at hand, and every form ends in the
extractor's exact or batched preprocessing (``rewardkit.metrics.extractor``):

* a tensor ``(B, 3, H, W)``: float in ``[0, 1]`` (the library convention) or uint8. Float input is
  mapped to the 0-255 scale and, with ``quantize=True`` (the default), rounded to integers, which is
  what saving the images as PNG and computing statistics from the files would do (reference statistics
  are usually computed from files). ``quantize=False`` keeps the floats (clean-fid's generator mode).
  The batch goes through ``prep.tensor`` (the batched path, on the extractor's device).
* a folder (recursive with ``recursive=True``), one image path, or a list of paths / PIL images: each
  image goes through ``prep.pil`` (the exact path of the reference) in a ``DataLoader`` with
  ``num_workers`` workers, then batched.
* any other iterable (e.g. a ``DataLoader``) yielding tensors, ``(images, labels, ...)`` tuples (the
  first element is used) or lists of PIL images: each item is treated as above.

Features are extracted under ``torch.inference_mode`` in float32. ``dtype="bf16"``/``"fp16"`` is the opt-in
fast mode, not a parity mode: the network runs under autocast through ``extractor.forward_low_precision``
(the FID Inception there holds a BatchNorm-folded, low-precision, channels-last copy of itself; with the real
weights it moves pool3 features by about 2 % of their maximum, see docs/speed.md). Features are
staged by ``update``: an update is all or nothing. A folder with a corrupt file raises
``ImageLoadError`` naming the file and leaves the metric as it was, so a retry does not count the
images twice. Staging holds features (float64 sums for Gaussian metrics, feature rows for the others),
never pixels. Subclasses implement the staging hooks ``_check_update``, ``_new_stage``, ``_stage`` and
``_commit``. Progress bars appear on terminals only.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from rewardkit.errors import check_images, describe
from rewardkit.metrics.extractor import FeatureExtractor, ImagePrep
from rewardkit.precision import autocast_for, parse_dtype

__all__ = ["FeatureMetric", "ImageSource", "iter_prepared_batches"]

ImageSource = Any  # tensor | path | folder | sequence of PIL/paths | iterable of batches
_UINT8_SCALE = 255.0


class _PilDataset(torch.utils.data.Dataset):
    """Items (paths or PIL images) -> prepared network input via the extractor's exact path."""

    def __init__(self, items: Sequence[Any], prep: ImagePrep) -> None:
        self.items, self.prep = list(items), prep

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor | str:
        from rewardkit.image_io import ImageLoadError, as_rgb, load_image

        item = self.items[index]
        try:
            image = load_image(item) if isinstance(item, (str, os.PathLike)) else as_rgb(item)
        except ImageLoadError as error:
            # Returned, not raised: a DataLoader worker would wrap the exception in a multi-line
            # "Caught ... in DataLoader worker process" message; the main process re-raises it as is.
            return str(error)
        return self.prep.pil(image)


def _collate(items: list[torch.Tensor | str]) -> torch.Tensor | str:
    """Stack prepared images ``(b, 3, h, w)``, or pass the first load error (a message) on."""
    failed = next((item for item in items if isinstance(item, str)), None)
    return failed if failed is not None else torch.stack(items)  # type: ignore[arg-type]


def _to_255(name: str, images: torch.Tensor, quantize: bool) -> torch.Tensor:
    """A uint8 or [0, 1] float batch -> float32 on the 0-255 scale (rounded if ``quantize``)."""
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
            raise ValueError(f"{name}: expected uint8 images (B, 3, H, W) with B >= 1, got {describe(images)}")
        return images.float()
    check_images(name, images)
    scaled = images.float() * _UINT8_SCALE
    return scaled.round() if quantize else scaled


def _is_pil(item: Any) -> bool:
    return type(item).__module__.startswith("PIL.")


def _file_items(source: Any, recursive: bool) -> list[Any] | None:
    """A path/folder/sequence of paths or PIL images -> a flat list of items; None for other sources."""
    from rewardkit.image_io import list_images

    if isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source)
        if path.is_dir():
            return list(list_images(path, recursive=recursive))
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; pass an image folder, an image file, a list of them, "
                                    "PIL images or a tensor")
        return [path]
    if _is_pil(source):
        return [source]
    if isinstance(source, (list, tuple)) and source and all(
            isinstance(x, (str, os.PathLike)) or _is_pil(x) for x in source):
        return list(source)
    if isinstance(source, (list, tuple)) and not source:
        raise ValueError("got an empty list of images; pass at least one image")
    return None


def iter_prepared_batches(source: ImageSource, prep: ImagePrep, *, name: str, batch_size: int = 32,
                          num_workers: int = 0, recursive: bool = False, quantize: bool = True,
                          device: torch.device | str = "cpu", progress: bool | None = None,
                          description: str = "") -> Iterator[torch.Tensor]:
    """Yield prepared network input ``(b, 3, *prep.size)`` float32 on ``device`` for any image source."""
    from tqdm.auto import tqdm

    items = _file_items(source, recursive)
    if items is not None:
        from rewardkit.image_io import ImageLoadError

        loader = torch.utils.data.DataLoader(_PilDataset(items, prep), batch_size=batch_size, shuffle=False,
                                             num_workers=num_workers, collate_fn=_collate)
        bar = tqdm(total=len(items), desc=description or name, unit="img", disable=_quiet(progress))
        for batch in loader:
            if isinstance(batch, str):
                bar.close()
                raise ImageLoadError(f"{name}: {batch}")
            bar.update(batch.shape[0])
            yield batch.to(device)
        bar.close()
        return
    if isinstance(source, torch.Tensor):
        images = _to_255(name, source, quantize)
        for start in range(0, images.shape[0], batch_size):
            yield prep.tensor(images[start : start + batch_size].to(device))
        return
    if isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
        for item in tqdm(source, desc=description or name, unit="batch", disable=_quiet(progress)):
            if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
                item = item[0]  # (images, labels, ...) batches, as DataLoaders over labelled datasets yield
            yield from iter_prepared_batches(item, prep, name=name, batch_size=batch_size, num_workers=0,
                                             recursive=recursive, quantize=quantize, device=device, progress=False)
        return
    raise TypeError(f"{name}: cannot read images from {describe(source)}; pass a float tensor (B, 3, H, W) in "
                    "[0, 1] or uint8, an image folder or file, a list of paths or PIL images, or a DataLoader of those")


def _quiet(progress: bool | None) -> bool | None:
    # tqdm: disable=None means "only on a terminal".
    return None if progress is None else not progress


class FeatureMetric(nn.Module):
    """Base class of the distribution metrics: an extractor plus a state fed with features.

    Subclasses implement the staging hooks (``_check_update``, ``_new_stage``, ``_stage``, ``_commit``),
    ``compute()``, ``reset()``, ``merge()``, ``sync()`` and ``get_extra_state`` / ``set_extra_state`` (so
    that ``state_dict()`` carries the statistics and a checkpointed metric resumes). The extractor is a
    submodule, so ``.to(device)`` moves it; state stays on the CPU (float64 sums, float32 rows).

    Args:
        extractor: the frozen feature network with its preprocessing.
        batch_size: images per forward pass.
        num_workers: ``DataLoader`` workers for files and PIL images.
        quantize: round float tensors to the uint8 grid before preprocessing (see module docstring).
        recursive: search sub-folders of folder inputs.
        dtype: ``None``/``"fp32"`` (exact) or ``"bf16"``/``"fp16"`` autocast (fast, not a parity mode).
        progress: ``None`` = progress bars on terminals only; ``True``/``False`` forces them.
    """

    name = "feature-metric"
    higher_is_better = False

    def __init__(self, extractor: FeatureExtractor, *, batch_size: int = 32, num_workers: int = 0,
                 quantize: bool = True, recursive: bool = False, dtype: Any = None,
                 progress: bool | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.extractor = extractor
        self.batch_size, self.num_workers = batch_size, num_workers
        self.quantize, self.recursive, self.progress = quantize, recursive, progress
        self.dtype = parse_dtype(dtype)

    @property
    def device(self) -> torch.device:
        param = next(self.extractor.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def train(self, mode: bool = True) -> FeatureMetric:
        return super().train(False)

    def features(self, images: ImageSource, *, description: str = "") -> torch.Tensor:
        """Features ``(N, D)`` float32 on the CPU of every image in ``images`` (any accepted source)."""
        return torch.cat(list(self.iter_features(images, description=description)))

    def iter_features(self, images: ImageSource, *, description: str = "") -> Iterator[torch.Tensor]:
        """Features batch by batch, ``(b, D)`` float32 on the CPU."""
        batches = iter_prepared_batches(
            images, self.extractor.prep, name=self.name, batch_size=self.batch_size, num_workers=self.num_workers,
            recursive=self.recursive, quantize=self.quantize, device=self.device, progress=self.progress,
            description=description)
        for prepared in batches:
            with torch.inference_mode(), autocast_for(self.device, self.dtype):
                if self.dtype is None:
                    features = self.extractor(prepared)
                else:
                    features = self.extractor.forward_low_precision(prepared, self.dtype)
            features = features.float().cpu()
            if not torch.isfinite(features).all():
                raise ValueError(f"{self.name}: the extractor returned NaN/inf features; check the weights "
                                 "(and dtype: fp16 overflows on some networks)")
            yield features

    def update(self, images: ImageSource, real: bool) -> None:
        """Add ``images`` to the real (reference) or generated side (any accepted source), all or nothing.

        The features of every image are staged first and committed after the last one, so an error on
        any image (e.g. a corrupt file: ``ImageLoadError`` naming it) leaves the state unchanged.
        """
        self._check_update(real)
        side = "real" if real else "generated"
        staged = self._new_stage()
        for features in self.iter_features(images, description=f"{self.name} {side}"):
            self._stage(staged, features, real)
        self._commit(staged, real)

    def update_features(self, features: torch.Tensor, real: bool) -> None:
        """Add precomputed feature rows ``(B, D)`` (all or nothing, like ``update``)."""
        self._check_update(real)
        staged = self._new_stage()
        self._stage(staged, features, real)
        self._commit(staged, real)

    # -- staging hooks (subclasses) -------------------------------------------------------------------
    def _check_update(self, real: bool) -> None:
        """Raise before any work if this side cannot take images now (synced, fixed reference, ...)."""

    def _new_stage(self) -> Any:  # pragma: no cover - interface
        """An empty scratch state that ``_stage`` fills and ``_commit`` adds to the metric."""
        raise NotImplementedError

    def _stage(self, staged: Any, features: torch.Tensor, real: bool) -> None:  # pragma: no cover - interface
        """Validate ``features`` ``(b, D)`` and add them to ``staged`` (never to the metric's state)."""
        raise NotImplementedError

    def _commit(self, staged: Any, real: bool) -> None:  # pragma: no cover - interface
        """Add ``staged`` to the metric's state; must not fail (everything was validated while staging)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, preset={self.extractor.prep.preset!r}, quantize={self.quantize}"
