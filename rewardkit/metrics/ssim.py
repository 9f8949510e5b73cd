"""SSIM and MS-SSIM as paired rewards: ``metric(images, reference=ref) -> (B,)``, differentiable.

Definitions: Wang, Bovik, Sheikh & Simoncelli 2004, "Image quality assessment: from error visibility to
structural similarity" (SSIM: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) and Wang, Simoncelli &
Bovik 2003, "Multi-scale structural similarity for image quality assessment" (MS-SSIM, five scales).
Libraries disagree on the border and on how scales are combined, so each convention is a named preset:

* ``"wang"`` (SSIM default) = scikit-image ``metrics/_structural_similarity.py``
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=..., channel_axis=0)``: the map is averaged over the valid interior only (cropped by
  ``(win - 1) / 2`` on every side), per channel, then over channels.
* ``"torchmetrics"`` = torchmetrics >= 1.4.2 ``functional/image/ssim.py``: torch ``reflect`` padding,
  the full H x W map averaged border included, variances clamped >= 0. Its MS-SSIM
  (``multiscale_structural_similarity_index_measure``, ``normalize="relu"``) takes the contrast term
  of scales 1-4 over the valid interior and the SSIM of scale 5 over the full map, averages over
  channels first, then multiplies ``relu(.) ** beta``; downsampling is ``avg_pool2d(2)`` (odd rows and
  columns dropped).
* ``"pytorch-msssim"`` (MS-SSIM default) = pytorch-msssim 1.0 ``ssim.py`` ``ssim`` / ``ms_ssim``:
  valid convolution, window built in float32, ``avg_pool2d(2, padding=size % 2)`` (zero padding counted
  in the average), ``relu(.) ** beta`` multiplied per channel, then averaged over channels.

``data_range`` is explicit: rewardkit images are float in ``[0, 1]``, so the default is 1.0; it is never
inferred from a batch (torchmetrics' ``data_range=None`` is batch dependent).

Precision (autocast is always off inside; outputs are float32): the default computes in float32 (never
half; ``dtype="bf16"``/``"fp16"`` change nothing), with each channel centred first: within 1.2e-7 of a
float64 computation on textured images and 1.9e-6 on images with large flat bright areas (torchmetrics'
own float32 path: 2.1e-4 there), at the references' speed. ``compute_dtype=torch.float64`` agrees with
the three references run in float64 to 1e-15 before the float32 cast, about 8x slower on CPU (and far
slower on GPUs with little fp64 throughput).
The pytorch-msssim preset is not centred, so in float32 it equals upstream's float32 path bit for bit.
Where ``relu`` zeroes a scale, ``relu(v) ** beta`` gets a zero gradient instead of upstream's NaN.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rewardkit.metrics.paired import PairedReward
from rewardkit.precision import parse_dtype
from rewardkit.protocols import RewardOutput

__all__ = ["SSIMConfig", "MSSSIMConfig", "SSIM", "MSSSIM", "SSIM_PRESETS", "MS_SSIM_PRESETS", "load_ssim",
           "load_ms_ssim"]

WANG_SIGMA = 1.5  # Wang et al. 2004: Gaussian weighting window, standard deviation 1.5 px
GAUSSIAN_TRUNCATE = 3.5  # scikit-image / torchmetrics: radius int(3.5 * sigma + 0.5) = 5 -> 11 px window
WANG_K1 = 0.01  # Wang et al. 2004: C1 = (K1 * L) ** 2
WANG_K2 = 0.03  # Wang et al. 2004: C2 = (K2 * L) ** 2
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, scales 1 (finest) to 5
DEFAULT_DATA_RANGE = 1.0  # rewardkit's canonical images are float in [0, 1]
DEFAULT_COMPUTE_DTYPE = torch.float32  # centred float32: <= 1.9e-6 from float64 (module docstring), reference speed
FLOAT64_COMPUTE_DTYPE = torch.float64  # opt-in: parity with the references run in float64 to 1e-15
_POOL = 2  # MS-SSIM: each scale is a 2x2 average-pooled copy of the previous one


@dataclass(frozen=True)
class SSIMConfig:
    """One SSIM convention.

    Attributes:
        sigma: Gaussian standard deviation in px; the window is ``2 * int(truncate * sigma + 0.5) + 1``.
        truncate: window radius in standard deviations (3.5, as scipy.ndimage / torchmetrics use).
        k1, k2: stabilisers, ``C1 = (k1 * data_range) ** 2`` and ``C2 = (k2 * data_range) ** 2``.
        border: ``"valid"`` (average the interior the window covers fully) or ``"reflect"`` (torch
            reflect-pad, average the full H x W map).
        clamp_variance: clamp the local variances at 0 (torchmetrics).
        float32_window: build the window in float32 before casting (pytorch-msssim).
        compute_dtype: ``torch.float32`` (default, centred) or ``torch.float64`` (1e-15 parity, slower).
    """

    sigma: float = WANG_SIGMA
    truncate: float = GAUSSIAN_TRUNCATE
    k1: float = WANG_K1
    k2: float = WANG_K2
    border: str = "valid"
    clamp_variance: bool = False
    float32_window: bool = False
    compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE

    def __post_init__(self) -> None:
        if self.border not in ("valid", "reflect"):
            raise ValueError(f"SSIMConfig.border must be 'valid' or 'reflect', got {self.border!r}")
        if not (self.sigma > 0 and self.truncate > 0):
            raise ValueError(f"SSIMConfig: sigma and truncate must be > 0, got {self.sigma}, {self.truncate}")
        if self.compute_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"SSIMConfig.compute_dtype must be torch.float64 or torch.float32, "
                             f"got {self.compute_dtype!r}")

    @property
    def radius(self) -> int:  # rounded as scipy.ndimage, scikit-image and torchmetrics round it
        return int(self.truncate * self.sigma + 0.5)

    @property
    def window_size(self) -> int:
        return 2 * self.radius + 1


@dataclass(frozen=True)
class MSSSIMConfig:
    """One MS-SSIM convention: the per-scale SSIM convention plus how scales are built and combined.

    Attributes:
        ssim: the SSIM convention of every scale (the contrast term always uses the valid interior).
        betas: exponent of each scale, finest first; the last scale contributes its full SSIM.
        pad_odd: downsample with ``avg_pool2d(2, padding=size % 2)`` (pytorch-msssim), not ``avg_pool2d(2)``.
        per_channel: combine scales per channel, then average channels (pytorch-msssim); otherwise
            average channels per scale first (torchmetrics).
    """

    ssim: SSIMConfig = SSIMConfig()
    betas: tuple[float, ...] = MS_SSIM_BETAS
    pad_odd: bool = True
    per_channel: bool = True

    @property
    def min_size(self) -> int:
        """Smallest side for which the coarsest scale still holds one full window."""
        factor, win = _POOL ** (len(self.betas) - 1), self.ssim.window_size
        # pad_odd rounds sizes up (ceil(s / factor) >= win), plain pooling rounds down (floor(...) >= win)
        return (win - 1) * factor + 1 if self.pad_odd else win * factor


SSIM_PRESETS: dict[str, SSIMConfig] = {
    "wang": SSIMConfig(),
    "torchmetrics": SSIMConfig(border="reflect", clamp_variance=True),
    "pytorch-msssim": SSIMConfig(float32_window=True),
}
MS_SSIM_PRESETS: dict[str, MSSSIMConfig] = {
    "pytorch-msssim": MSSSIMConfig(SSIM_PRESETS["pytorch-msssim"], pad_odd=True, per_channel=True),
    "torchmetrics": MSSSIMConfig(SSIM_PRESETS["torchmetrics"], pad_odd=False, per_channel=False),
}


def _window(cfg: SSIMConfig, device: torch.device) -> torch.Tensor:
    """The normalised 1-D Gaussian, ``(win,)`` in ``cfg.compute_dtype``."""
    build = torch.float32 if cfg.float32_window else torch.float64  # then rounded once to compute_dtype
    offsets = torch.arange(-cfg.radius, cfg.radius + 1, dtype=build, device=device)
    weights = torch.exp(-(offsets**2) / (2 * cfg.sigma**2))  # pytorch-msssim's float32 rounding, exactly
    return (weights / weights.sum()).to(cfg.compute_dtype)


def _ssim_per_channel(
    x: torch.Tensor, y: torch.Tensor, cfg: SSIMConfig, window: torch.Tensor, data_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term per channel, each ``(B, C)``.

    ``x``, ``y``: ``(B, C, H, W)`` in ``cfg.compute_dtype`` with H, W >= the window. SSIM is averaged
    over ``cfg.border``'s region, the contrast term over the valid interior (as both MS-SSIMs do).
    """
    channels, radius, win = x.shape[1], cfg.radius, window.numel()
    # (Co)variances do not change under a constant shift, so centring each channel keeps float32
    # E[x^2] - mu^2 from cancelling (flat bright images: 1.4e-6 -> 9e-8 from float64). Not with
    # pytorch-msssim's float32 window: its weights sum to 1 only within 1e-7, which makes a shift visible.
    shift = torch.zeros((), dtype=x.dtype, device=x.device)
    if not cfg.float32_window:
        shift = ((x + y) / 2).mean(dim=(2, 3), keepdim=True).detach()
        x, y = x - shift, y - shift
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5C, H, W)
    if cfg.border == "reflect":
        stack = F.pad(stack, (radius, radius, radius, radius), mode="reflect")
    groups = stack.shape[1]
    stack = F.conv2d(stack, window.view(1, 1, win, 1).expand(groups, 1, win, 1), groups=groups)  # separable:
    stack = F.conv2d(stack, window.view(1, 1, 1, win).expand(groups, 1, 1, win), groups=groups)  # rows, cols
    mu_x, mu_y, e_xx, e_yy, e_xy = stack.split(channels, dim=1)
    var_x, var_y, cov = e_xx - mu_x * mu_x, e_yy - mu_y * mu_y, e_xy - mu_x * mu_y
    if cfg.clamp_variance:
        var_x, var_y = var_x.clamp_min(0.0), var_y.clamp_min(0.0)
    c1, c2 = (cfg.k1 * data_range) ** 2, (cfg.k2 * data_range) ** 2
    cs_map = (2.0 * cov + c2) / (var_x + var_y + c2)
    mu_x, mu_y = mu_x + shift, mu_y + shift
    ssim_map = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1) * cs_map
    if cfg.border == "reflect":
        cs_map = cs_map[..., radius:-radius, radius:-radius]
    return ssim_map.mean(dim=(2, 3)), cs_map.mean(dim=(2, 3))


def _relu_pow(values: torch.Tensor, exponent: float) -> torch.Tensor:
    """``relu(values) ** exponent`` with a zero (not NaN) gradient where ``values <= 0``."""
    positive = values > 0
    safe = torch.where(positive, values, torch.ones_like(values))
    return torch.where(positive, safe**exponent, torch.zeros_like(values))


class _SSIMBase(PairedReward):
    """Shared plumbing: data range, size check, compute dtype; subclasses set ``name``."""

    higher_is_better = True
    differentiable = True
    requires_prompt = False

    def __init__(self, cfg: SSIMConfig, data_range: float, preset: str) -> None:
        super().__init__()
        data_range = float(data_range)
        if not 0 < data_range < float("inf"):
            raise ValueError(f"{self.name}: data_range must be a finite number > 0 (1.0 for [0, 1] images), "
                             f"got {data_range}")
        self.cfg, self.data_range, self.preset = cfg, data_range, preset

    @property
    def min_size(self) -> int:
        """Smallest image side (px) this metric accepts."""
        return self.cfg.window_size

    def _prepare(self, images: torch.Tensor, reference: torch.Tensor, why: str) -> tuple:
        (height, width), minimum = images.shape[-2:], self.min_size
        if min(height, width) < minimum:
            raise ValueError(f"{self.name} (preset {self.preset!r}): images must be at least {minimum}x{minimum} "
                             f"px {why}, got {height}x{width}; upsample both images and reference")
        dtype = self.cfg.compute_dtype
        if dtype == torch.float64 and images.device.type == "mps":
            raise ValueError(f"{self.name}: MPS has no float64; load with dtype='bf16' (float32 compute)")
        return images.to(dtype), reference.to(dtype), _window(self.cfg, images.device)

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, data_range={self.data_range}, cfg={self.cfg}"


class SSIM(_SSIMBase):
    """Per-image SSIM, float32 ``(B,)`` in ``[-1, 1]`` (1 = identical), mean over channels and region.

    Args:
        cfg: the convention (see ``SSIM_PRESETS``); ``preset`` names it in messages and ``repr``.
        data_range: value range of the images (1.0 for rewardkit's ``[0, 1]`` images).
    """

    name = "ssim"

    def __init__(self, cfg: SSIMConfig = SSIM_PRESETS["wang"], data_range: float = DEFAULT_DATA_RANGE,
                 preset: str = "wang") -> None:
        super().__init__(cfg, data_range, preset)

    def score_pairs(self, images: torch.Tensor, reference: torch.Tensor) -> RewardOutput:
        why = f"to hold one {self.cfg.window_size}-px window (sigma {self.cfg.sigma})"
        with torch.autocast(images.device.type, enabled=False):
            x, y, window = self._prepare(images, reference, why)
            ssim, _ = _ssim_per_channel(x, y, self.cfg, window, self.data_range)
        return RewardOutput(ssim.mean(dim=1).float())


class MSSSIM(_SSIMBase):
    """Per-image MS-SSIM, float32 ``(B,)`` in ``[0, 1]`` (1 = identical).

    Score: ``prod_{s<S} relu(cs_s) ** beta_s * relu(ssim_S) ** beta_S`` over ``S`` scales, each a 2x
    average-pooled copy of the previous one; channels are averaged as ``cfg.per_channel`` says.

    Args:
        cfg: the convention (see ``MS_SSIM_PRESETS``); ``preset`` names it in messages and ``repr``.
        data_range: value range of the images (1.0 for rewardkit's ``[0, 1]`` images).
    """

    name = "ms-ssim"

    def __init__(self, cfg: MSSSIMConfig = MS_SSIM_PRESETS["pytorch-msssim"],
                 data_range: float = DEFAULT_DATA_RANGE, preset: str = "pytorch-msssim") -> None:
        super().__init__(cfg.ssim, data_range, preset)
        self.ms_cfg = cfg

    @property
    def min_size(self) -> int:
        return self.ms_cfg.min_size

    def score_pairs(self, images: torch.Tensor, reference: torch.Tensor) -> RewardOutput:
        ms, last = self.ms_cfg, len(self.ms_cfg.betas) - 1
        why = f"(after {last} halvings the coarsest scale must hold one {self.cfg.window_size}-px window; " \
              "use 'ssim' for smaller images)"
        with torch.autocast(images.device.type, enabled=False):
            x, y, window = self._prepare(images, reference, why)
            score = torch.ones((), dtype=x.dtype, device=x.device)
            for level, beta in enumerate(ms.betas):
                ssim, cs = _ssim_per_channel(x, y, self.cfg, window, self.data_range)
                term = ssim if level == last else cs
                score = score * _relu_pow(term if ms.per_channel else term.mean(dim=1), beta)
                if level < last:
                    padding = [size % 2 for size in x.shape[-2:]] if ms.pad_odd else 0
                    x, y = (F.avg_pool2d(t, _POOL, padding=padding) for t in (x, y))
        return RewardOutput((score.mean(dim=1) if ms.per_channel else score).float())


def _configure(name: str, weights: Any, dtype: Any, preset: str, presets: dict, overrides: dict) -> Any:
    if weights is not None:
        raise ValueError(f"{name}: has no weights (a closed-form metric); call load({name!r}) without weights=")
    parse_dtype(dtype)  # validated; half precision would wreck the variances, so the compute stays float32
    if preset not in presets:
        raise ValueError(f"{name}: unknown preset {preset!r}; choose one of {sorted(presets)}")
    return presets[preset]


def _override(cfg: Any, name: str, options: dict[str, Any], accepted: set[str]) -> Any:
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cfg)})
    if unknown:
        raise TypeError(f"{name}: unknown options {unknown}; accepted: data_range, preset, {sorted(accepted)}")
    return dataclasses.replace(cfg, **options)


def load_ssim(weights: Any = None, device: Any = None, dtype: Any = None, preset: str = "wang",
              data_range: float = DEFAULT_DATA_RANGE, **overrides: Any) -> SSIM:
    """Build the SSIM paired reward (images at least 11 px a side with the default window).

    Args:
        weights: must be ``None`` (SSIM has no weights).
        device: accepted for the registry contract; SSIM has no parameters and runs on the images' device.
        dtype: ``None`` (exact: float64 compute) or ``"bf16"``/``"fp16"`` (fast: float32 compute). No
            autocast either way: half precision is useless for SSIM's variances. Output is float32.
        preset: ``"wang"`` (scikit-image, valid interior), ``"torchmetrics"`` (reflect pad, full map) or
            ``"pytorch-msssim"`` (valid interior, float32 window).
        data_range: value range of the inputs; 1.0 for rewardkit's ``[0, 1]`` images.
        **overrides: ``SSIMConfig`` fields (``sigma``, ``k1``, ``k2``, ``compute_dtype``, ...).
    """
    cfg = _configure("ssim", weights, dtype, preset, SSIM_PRESETS, overrides)
    cfg = _override(cfg, "ssim", overrides, {f.name for f in dataclasses.fields(SSIMConfig)})
    return SSIM(cfg, data_range, preset).to(device or "cpu").freeze()


def load_ms_ssim(weights: Any = None, device: Any = None, dtype: Any = None, preset: str = "pytorch-msssim",
                 data_range: float = DEFAULT_DATA_RANGE, **overrides: Any) -> MSSSIM:
    """Build the MS-SSIM paired reward (images at least ``MS_SSIM_PRESETS[preset].min_size`` px a side).

    Args:
        weights: must be ``None`` (MS-SSIM has no weights).
        device: accepted for the registry contract; runs on the images' device.
        dtype: ``None`` (exact: float64 compute) or ``"bf16"``/``"fp16"`` (fast: float32), as ``load_ssim``.
        preset: ``"pytorch-msssim"`` (valid interior, >= 161 px) or ``"torchmetrics"`` (>= 176 px).
        data_range: value range of the inputs; 1.0 for rewardkit's ``[0, 1]`` images.
        **overrides: ``MSSSIMConfig`` fields (``betas``) or ``SSIMConfig`` fields (``sigma``, ...).
    """
    cfg = _configure("ms-ssim", weights, dtype, preset, MS_SSIM_PRESETS, overrides)
    ssim_fields = {f.name for f in dataclasses.fields(SSIMConfig)}
    accepted = ssim_fields | {f.name for f in dataclasses.fields(MSSSIMConfig)} - {"ssim"}
    ssim_cfg = _override(cfg.ssim, "ms-ssim", {k: v for k, v in overrides.items() if k in ssim_fields}, accepted)
    cfg = _override(cfg, "ms-ssim", {k: v for k, v in overrides.items() if k not in ssim_fields}, accepted)
    return MSSSIM(dataclasses.replace(cfg, ssim=ssim_cfg), data_range, preset).to(device or "cpu").freeze()
