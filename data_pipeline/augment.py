"""Augmentation: per-sample parameters drawn in Python, applied by DALI or by torchvision.

Why draw them here instead of with DALI's random operators: a parameter that is a function of
(seed, epoch, sample index) alone makes augmentation independent of the world size, the
backend and where a run resumed, so a restarted loader reproduces the uninterrupted run's
batches exactly. DALI consumes the parameters as per-sample argument inputs (its own RNG
state would restart with each new pipeline).

Parameter vector per sample (float32), in normalised image coordinates:
  0-3 crop x, y, w, h   4 flip (0/1)   5 angle (deg, counter-clockwise)
  6 brightness  7 contrast  8 saturation (0 = grayscale)  9 hue (degrees)  10 blur sigma (0 = none)
Order of operations, the same in both backends: crop → resize to the output size → rotate →
colour → blur → flip → normalise. Augmenting after the resize is what makes it cheap. In DALI,
the steps after the resize run either as DALI operators (the GPU path) or, on the CPU, as one
fused kernel (augment_kernel.py), where DALI's CPU operators are slow.

Contrast scales about the image's mean grey in torchvision and about mid-grey (128) in DALI's
`color_twist`; `contrast_shift` makes DALI's mean torchvision's. Hue is a rotation in YIQ
space in DALI (luma kept) and a shift of the HSV hue in torchvision (value kept): the same
parameter changed skin tones as much between the backends as the augmentation itself, so the
torch backend applies DALI's YIQ rotation (`yiq_hue_matrix`) instead of `adjust_hue`.
tests/test_loader.py measures each knob alone in both backends.
"""

from __future__ import annotations

import math

import numpy as np

from data_pipeline.config import AugmentPolicy, LoaderConfig

NUM_PARAMS = 11
IDENTITY = np.array([0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0], dtype=np.float32)


def blur_kernel(sigma_max: float) -> int:
    return max(3, 2 * math.ceil(3 * sigma_max) + 1)


def draw_params(policy: AugmentPolicy, seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """(num_samples, NUM_PARAMS) parameters of one epoch, row i for sample i: a function of
    (seed, epoch, i) only, drawn at once (vectorised) and looked up by sample index."""
    p = policy.scaled()
    rng = np.random.default_rng([seed, epoch, 0xA6])
    n, tries = num_samples, 10
    v = np.tile(IDENTITY, (n, 1))
    # torchvision's RandomResizedCrop rule (first of 10 tries that fits, else the whole image),
    # in units of the image's own width and height.
    area = rng.uniform(*p.crop_scale, size=(n, tries))
    ratio = np.exp(rng.uniform(math.log(p.crop_ratio[0]), math.log(p.crop_ratio[1]), size=(n, tries)))
    w, h = np.sqrt(area * ratio), np.sqrt(area / ratio)
    fits = (w <= 1) & (h <= 1)
    first = fits.argmax(axis=1)
    ok = fits[np.arange(n), first]
    w, h = np.where(ok, w[np.arange(n), first], 1.0), np.where(ok, h[np.arange(n), first], 1.0)
    v[:, 0], v[:, 1] = rng.random(n) * (1 - w), rng.random(n) * (1 - h)
    v[:, 2], v[:, 3] = w, h
    v[:, 4] = rng.random(n) < p.hflip
    v[:, 5] = rng.uniform(-p.rotation, p.rotation, n)
    v[:, 6] = rng.uniform(1 - p.brightness, 1 + p.brightness, n)
    v[:, 7] = rng.uniform(1 - p.contrast, 1 + p.contrast, n)
    v[:, 8] = np.where(rng.random(n) < p.grayscale, 0.0, rng.uniform(1 - p.saturation, 1 + p.saturation, n))
    v[:, 9] = rng.uniform(-p.hue, p.hue, n) * 360.0
    v[:, 10] = np.where(rng.random(n) < p.blur, rng.uniform(*p.blur_sigma, n), 0.0)
    return v


# NTSC RGB -> YIQ
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB = np.linalg.inv(_YIQ)


def yiq_hue_matrix(degrees: float) -> np.ndarray:
    """3x3 RGB matrix of DALI's hue change: the chroma plane (I, Q) turned by -degrees
    (checked against `color_twist` to 1e-3). Written out because torchvision has no YIQ hue."""
    t = math.radians(-degrees)
    turn = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    return _RGB @ turn @ _YIQ


# ---------------------------------------------------------------- DALI

def dali_images(jpegs, params, cfg: LoaderConfig, train: bool, device: str):
    """DALI graph from encoded images (+ parameters when training) to normalised CHW float."""
    from nvidia.dali import fn, types

    size = cfg.image_size
    decoder = "mixed" if device == "gpu" else "cpu"
    norm = dict(dtype=types.FLOAT, output_layout="CHW", mean=[255 * m for m in cfg.mean],
                std=[255 * s for s in cfg.std])
    if not train:
        img = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
        img = fn.resize(img, resize_shorter=size / cfg.eval_crop_pct, antialias=True)
        return fn.crop_mirror_normalize(img, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5, **norm)
    p = cfg.augment.scaled()
    img = fn.decoders.image_slice(jpegs, params[0:2], params[2:4], device=decoder, output_type=types.RGB,
                                  normalized_anchor=True, normalized_shape=True)
    img = fn.resize(img, size=(size, size), antialias=True)
    if augment_ops(cfg) == "fused":
        from data_pipeline.augment_kernel import fused_augment
        return fused_augment(img, params, cfg)
    if p.rotation > 0:
        img = fn.rotate(img, angle=params[5], keep_size=True, fill_value=0)
    mean = norm.pop("mean")
    if p.brightness or p.contrast or p.saturation or p.hue or p.grayscale:
        if p.contrast:
            mean = types.Constant(np.array(mean, np.float32)) - contrast_shift(img, params[6], params[7])
        img = fn.color_twist(img, brightness=params[6], contrast=params[7], saturation=params[8], hue=params[9])
    if p.blur > 0:
        from nvidia.dali import math as dmath
        blurred = fn.gaussian_blur(img, sigma=dmath.max(params[10], 1e-3), window_size=blur_kernel(p.blur_sigma[1]))
        keep = fn.cast(params[10] <= 0, dtype=types.FLOAT)
        img = fn.cast(blurred * (1.0 - keep) + img * keep, dtype=types.UINT8)
    return fn.crop_mirror_normalize(img, mirror=fn.cast(params[4], dtype=types.INT32), mean=mean, **norm)


def augment_ops(cfg: LoaderConfig) -> str:
    """Which implementation augments after the resize: `fused` (one Numba kernel, the fast
    choice on the CPU) or `dali` (DALI's operators, the fast choice on the GPU)."""
    if cfg.augment_ops == "auto":
        return "dali" if cfg.device == "gpu" else "fused"
    return cfg.augment_ops


def contrast_shift(img, brightness, contrast):
    """Per sample, what turns DALI's contrast into torchvision's: DALI scales about mid-grey
    (128), torchvision about the mean grey m of the brightness-adjusted image; the results
    differ by b(1 - c)(m - 128) on every channel. A grey offset passes unchanged through
    saturation, hue (both keep the grey axis), blur and flip, so it goes into the
    normalisation's per-sample mean instead of another pass over the pixels."""
    from nvidia.dali import fn, types

    grey = fn.reductions.mean(fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY),
                              dtype=types.FLOAT)
    return brightness * (1.0 - contrast) * (grey - 128.0)


# ---------------------------------------------------------------- torchvision

def torch_image(pil_image, params: np.ndarray | None, cfg: LoaderConfig, train: bool):
    """The same transform with torchvision.transforms.v2 (functional form, so that it can take
    the drawn parameters)."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    size = cfg.image_size
    img = F.to_image(pil_image)
    if not train:
        img = F.resize(img, [round(size / cfg.eval_crop_pct)], antialias=True)
        img = F.center_crop(img, [size, size])
    else:
        p = cfg.augment.scaled()
        h_img, w_img = img.shape[-2:]
        x, y, w, h = params[0:4]
        img = F.resized_crop(img, top=round(y * h_img), left=round(x * w_img), height=max(1, round(h * h_img)),
                             width=max(1, round(w * w_img)), size=[size, size], antialias=True)
        if p.rotation > 0:
            img = F.rotate(img, float(params[5]), interpolation=InterpolationMode.BILINEAR, fill=0)
        if p.brightness or p.contrast or p.saturation or p.hue or p.grayscale:
            img = F.adjust_brightness(img, float(params[6]))
            img = F.adjust_contrast(img, float(params[7]))
            img = F.adjust_saturation(img, float(params[8]))
            if params[9]:
                m = torch.from_numpy(yiq_hue_matrix(float(params[9]))).float()
                img = torch.einsum("ij,jhw->ihw", m, img.float()).round_().clamp_(0, 255).to(torch.uint8)
        if params[10] > 0:
            k = blur_kernel(p.blur_sigma[1])
            img = F.gaussian_blur(img, [k, k], [float(params[10])] * 2)
        if params[4]:
            img = F.horizontal_flip(img)
    img = F.to_dtype(img, torch.float32, scale=True)
    return F.normalize(img, list(cfg.mean), list(cfg.std))
