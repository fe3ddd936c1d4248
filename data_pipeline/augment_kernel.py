"""Fused augmentation for DALI's CPU mode: rotate → colour → blur → flip → normalise in one
Numba-compiled kernel per resized image, run by DALI's `numba_function` operator in DALI's
own worker threads.

Why hand-written: DALI 2.4's CPU `rotate` and `color_twist` kernels are slow per pixel. On the
2-core dev machine, at 112 px, they cost ~350-550 and ~270 µs per image. That is more than the
JPEG decode and resize they follow (~500 µs). This kernel does all of the augmentation after the
resize, normalisation included, in ~120 µs. On a GPU, DALI's own operators are fast and are
used instead (`augment.dali_images`). Tests run both, on the CPU, against torchvision.

Semantics are torchvision's, so that the knobs mean the same in every backend:
  rotation   counter-clockwise about the image centre, bilinear, taps outside the image read 0
             (torchvision's fill=0 also darkens the 1-px edge band by its validity mask);
  colour     brightness, then contrast about the mean grey, saturation, and DALI's YIQ hue,
             each clamped to [0, 255] like torchvision's uint8 steps;
  blur       separable Gaussian, torchvision's kernel and reflect border;
  flip       horizontal;
  normalise  (x / 255 - mean) / std, written as CHW float32.
Values stay float between the steps (torchvision rounds to uint8 after each one).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import carray, cfunc, njit
from numba import types as nbt
from numba.core import cgutils
from numba.extending import intrinsic

from data_pipeline.augment import blur_kernel, yiq_hue_matrix
from data_pipeline.config import LoaderConfig

GREY_R, GREY_G, GREY_B = 0.2989, 0.587, 0.114  # torchvision's rgb_to_grayscale weights
BIAS = 1 << 14  # keeps source coordinates positive, so that int() floors (images < 16k px)
TOP = np.float32(255.0)
# DALI's hue turn, yiq_hue_matrix(d), is linear in cos and sin of t = -d:
# H = HUE_A + cos(t) HUE_B + sin(t) HUE_C, the three read off it at d = 0, 180 and -90.
HUE_A = (yiq_hue_matrix(0) + yiq_hue_matrix(180)) / 2
HUE_B = (yiq_hue_matrix(0) - yiq_hue_matrix(180)) / 2
HUE_C = yiq_hue_matrix(-90) - HUE_A


def kernel_constants(mean, std, window: int) -> list[float]:
    """The kernel's per-pipeline constants as DALI hands them over (float32): the normalisation's
    3 means and 3 inverse scales in grey levels, then the blur window."""
    norm = [255.0 * m for m in mean] + [1.0 / (255.0 * s) for s in std]
    return [float(v) for v in np.asarray([*norm, window], np.float32)]


@njit(inline="always")
def clamp(v):
    return min(255.0, max(0.0, v))


@njit(inline="always")
def reflect(i, n):
    """torchvision's 'reflect' padding index (the edge pixel is not repeated)."""
    if n == 1:
        return 0
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


# cache=True: compiled once per machine (~1.5 s), not once per pipeline that a process builds.
@njit(fastmath=True, cache=True)
def augment(out, img, p, norm, window):
    h, w = img.shape[0], img.shape[1]
    flip = p[4] > 0.5
    angle = math.radians(p[5])
    ca, sa = math.cos(angle), math.sin(angle)
    cx, cy = w * 0.5, h * 0.5
    bright = p[6]
    grey_sum = 0.0
    # 1. rotate (inverse map of each output pixel centre) and brighten; write flipped.
    # The source is first made planar float32 with a 1-pixel border of the fill value 0:
    # gathers from it are ~2x faster than from interleaved uint8, and every tap is inside.
    pad = np.zeros((3, h + 2, w + 2), np.float32)
    for y in range(h):
        for x in range(w):
            pad[0, y + 1, x + 1] = img[y, x, 0]
            pad[1, y + 1, x + 1] = img[y, x, 1]
            pad[2, y + 1, x + 1] = img[y, x, 2]
    for y in range(h):
        dy = y + 0.5 - cy
        # source of output pixel x = 0 in padded coordinates (+1), biased by +BIAS;
        # each step in x adds (ca, sa)
        sx = -sa * dy + cx - 0.5 + ca * (0.5 - cx) + 1.0 + BIAS
        sy = ca * dy + cy - 0.5 + sa * (0.5 - cx) + 1.0 + BIAS
        xo = w - 1 if flip else 0
        step = -1 if flip else 1
        for x in range(w):
            x0, y0 = int(sx), int(sy)
            fx, fy = np.float32(sx - x0), np.float32(sy - y0)
            x0 -= BIAS
            y0 -= BIAS
            r = g = b = np.float32(0.0)
            if 0 <= x0 <= w and 0 <= y0 <= h:
                r0 = pad[0, y0, x0] + fx * (pad[0, y0, x0 + 1] - pad[0, y0, x0])
                r1 = pad[0, y0 + 1, x0] + fx * (pad[0, y0 + 1, x0 + 1] - pad[0, y0 + 1, x0])
                g0 = pad[1, y0, x0] + fx * (pad[1, y0, x0 + 1] - pad[1, y0, x0])
                g1 = pad[1, y0 + 1, x0] + fx * (pad[1, y0 + 1, x0 + 1] - pad[1, y0 + 1, x0])
                b0 = pad[2, y0, x0] + fx * (pad[2, y0, x0 + 1] - pad[2, y0, x0])
                b1 = pad[2, y0 + 1, x0] + fx * (pad[2, y0 + 1, x0 + 1] - pad[2, y0 + 1, x0])
                r, g, b = r0 + fy * (r1 - r0), g0 + fy * (g1 - g0), b0 + fy * (b1 - b0)
            sx += ca
            sy += sa
            # values are >= 0 here: only the top needs clamping (in float32: half the cost)
            r, g, b = min(bright * r, TOP), min(bright * g, TOP), min(bright * b, TOP)
            out[0, y, xo], out[1, y, xo], out[2, y, xo] = r, g, b
            xo += step
            grey_sum += GREY_R * r + GREY_G * g + GREY_B * b
    # 2. contrast about the mean grey, saturation, hue (always applied: the identity at 0 degrees)
    con, sat = p[7], p[8]
    offset = (1.0 - con) * grey_sum / (h * w)
    t = math.radians(-p[9])
    hue = HUE_A + math.cos(t) * HUE_B + math.sin(t) * HUE_C
    blur = p[10] > 0
    # normalise in this pass, or after the blur
    colour(out.reshape(-1), h * w, con, sat, offset, hue, (0.0, 0.0, 0.0, 1.0, 1.0, 1.0) if blur else norm)
    if not blur:
        return
    # 3. separable Gaussian blur (reflect border), then normalise
    half = window // 2
    kern = np.empty(window)
    total = 0.0
    for k in range(window):
        kern[k] = math.exp(-0.5 * ((k - half) / p[10]) ** 2)
        total += kern[k]
    kern /= total
    line = np.empty(max(h, w) + 2 * half)  # one reflect-padded row or column
    for c in range(3):
        for y in range(h):
            for k in range(w + 2 * half):
                line[k] = out[c, y, reflect(k - half, w)]
            for x in range(w):
                acc = 0.0
                for k in range(window):
                    acc += kern[k] * line[x + k]
                out[c, y, x] = acc
        for x in range(w):
            for k in range(h + 2 * half):
                line[k] = out[c, reflect(k - half, h), x]
            for y in range(h):
                acc = 0.0
                for k in range(window):
                    acc += kern[k] * line[y + k]
                out[c, y, x] = acc
    for c in range(3):
        out[c] = (out[c] - norm[c]) * norm[3 + c]


@njit(fastmath=True, cache=True)
def colour(flat, n, con, sat, offset, hue, norm):
    """Contrast, saturation, hue turn and normalisation of each pixel of the planar image
    `flat`, each colour step clamped. A loop without branches, which the compiler
    vectorises; in a function of its own, because inlined into `augment` it ran ~5x slower."""
    h00, h01, h02 = hue[0, 0], hue[0, 1], hue[0, 2]
    h10, h11, h12 = hue[1, 0], hue[1, 1], hue[1, 2]
    h20, h21, h22 = hue[2, 0], hue[2, 1], hue[2, 2]
    n0, n1, n2, k0, k1, k2 = norm
    for k in range(n):
        r = clamp(con * flat[k] + offset)
        g = clamp(con * flat[k + n] + offset)
        b = clamp(con * flat[k + 2 * n] + offset)
        grey = (1.0 - sat) * (GREY_R * r + GREY_G * g + GREY_B * b)
        r, g, b = clamp(sat * r + grey), clamp(sat * g + grey), clamp(sat * b + grey)
        flat[k] = (clamp(h00 * r + h01 * g + h02 * b) - n0) * k0
        flat[k + n] = (clamp(h10 * r + h11 * g + h12 * b) - n1) * k1
        flat[k + 2 * n] = (clamp(h20 * r + h21 * g + h22 * b) - n2) * k2


# DALI's `numba_function` compiles a fresh cfunc wrapper around the Python run function in every
# process that builds a pipeline (~4 s on the 2-core machine, before the first batch; numba cannot
# cache it: the wrapper closes over per-call lambdas). These two cfuncs speak the same C ABI as
# DALI's wrappers (CPU, one sample per call) for this operator's fixed types, and are cached on
# disk like the kernel, so a new process loads them in milliseconds. Layout, from DALI's
# plugin/numba: out_ptr / in_ptr point to one data address per output / input; *_shapes_ptr to
# one shape address per (output or input, sample); *_ndims_ptr to one int32 per output / input.
_RUN_SIG = nbt.void(nbt.uint64, nbt.uint64, nbt.uint64, nbt.int32, nbt.uint64, nbt.uint64, nbt.uint64, nbt.int32)
_SETUP_SIG = nbt.void(nbt.uint64, nbt.uint64, nbt.int32, nbt.uint64, nbt.uint64, nbt.int32, nbt.int32)


@intrinsic
def _as_pointer(typingctx, src):
    """An integer address as a void pointer (what `carray` takes)."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return nbt.voidptr(src), codegen


@njit(inline="always")
def _int64s(address, n):
    return carray(_as_pointer(address), n, dtype=np.int64)


@cfunc(_RUN_SIG, nopython=True, cache=True)
def _run_cfunc(out_ptr, out_shapes_ptr, out_ndims_ptr, num_outs, in_ptr, in_shapes_ptr, in_ndims_ptr, num_ins):
    """out0: (3, H, W) float32; in0: (H, W, 3) uint8 image; in1: float32 parameters; in2: float32
    constants (the normalisation's 3 means and 3 inverse scales, then the blur window)."""
    outs, ins = _int64s(out_ptr, 1), _int64s(in_ptr, 3)
    out_shape = _int64s(_int64s(out_shapes_ptr, 1)[0], 3)
    in_shapes = _int64s(in_shapes_ptr, 3)
    img_shape = _int64s(in_shapes[0], 3)
    out = carray(_as_pointer(outs[0]), (out_shape[0], out_shape[1], out_shape[2]), dtype=np.float32)
    img = carray(_as_pointer(ins[0]), (img_shape[0], img_shape[1], img_shape[2]), dtype=np.uint8)
    p = carray(_as_pointer(ins[1]), _int64s(in_shapes[1], 1)[0], dtype=np.float32)
    c = carray(_as_pointer(ins[2]), 7, dtype=np.float32)
    augment(out, img, p, (np.float64(c[0]), np.float64(c[1]), np.float64(c[2]), np.float64(c[3]),
                          np.float64(c[4]), np.float64(c[5])), int(c[6]))


@cfunc(_SETUP_SIG, nopython=True, cache=True)
def _setup_cfunc(out_shapes_ptr, out_ndims_ptr, num_outs, in_shapes_ptr, in_ndims_ptr, num_ins, num_samples):
    """Output shape (3, H, W) for each (H, W, 3) input image."""
    out_shapes, in_shapes = _int64s(out_shapes_ptr, num_samples), _int64s(in_shapes_ptr, num_samples)
    for i in range(num_samples):
        o, s = _int64s(out_shapes[i], 3), _int64s(in_shapes[i], 3)
        o[0], o[1], o[2] = 3, s[0], s[1]


@functools.cache
def _precompiled_op_class():
    """DALI's NumbaFunction operator, given the addresses of the cached cfuncs above instead of
    Python functions to compile. It overrides two private methods of DALI's (pinned in
    pyproject.toml); tests/test_augment_kernel.py fails if a DALI upgrade changes them or the ABI."""
    from nvidia.dali.plugin.numba import NumbaFunction

    class PrecompiledNumbaFunction(NumbaFunction):
        def _get_run_fn_cpu(self, run_fn, *args):
            return run_fn

        def _get_setup_fn_cpu(self, setup_fn):
            return setup_fn

    return PrecompiledNumbaFunction


def fused_augment(img, params, cfg: LoaderConfig):
    """DALI node: resized uint8 HWC images + parameters → augmented, normalised CHW float."""
    from nvidia.dali import fn, types

    window = blur_kernel(cfg.augment.scaled().blur_sigma[1])
    consts = fn.constant(fdata=kernel_constants(cfg.mean, cfg.std, window), shape=[7], dtype=types.FLOAT)
    op = _precompiled_op_class()(run_fn=_run_cfunc.address, setup_fn=_setup_cfunc.address, out_types=[types.FLOAT],
                                 in_types=[types.UINT8, types.FLOAT, types.FLOAT], outs_ndim=[3], ins_ndim=[3, 1, 1],
                                 device="cpu")
    return op(img, params, consts)
