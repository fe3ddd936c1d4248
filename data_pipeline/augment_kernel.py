"""Fused augmentation for DALI's CPU mode: rotate → colour → blur → flip → normalise in one
Numba-compiled kernel per resized image, run by DALI's `numba_function` operator in DALI's
own worker threads.

Why hand-written: DALI 2.4's CPU `rotate` and `color_twist` kernels are slow per pixel. On the
2-core dev machine, at 112 px, they cost ~350-550 and ~270 µs per image. That is more than the
JPEG decode and resize they follow (~500 µs). This kernel does all of the augmentation after the
resize, normalisation included, in ~150 µs. On a GPU, DALI's own operators are fast and are
used instead (`augment.dali_images`). Tests run both, on the CPU, against torchvision.

Semantics are torchvision's, so that the knobs mean the same in every backend:
  rotation   counter-clockwise about the image centre, bilinear, zero fill;
  colour     brightness, then contrast about the mean grey, saturation, and DALI's YIQ hue,
             each clamped to [0, 255] like torchvision's uint8 steps;
  blur       separable Gaussian, torchvision's kernel and reflect border;
  flip       horizontal;
  normalise  (x / 255 - mean) / std, written as CHW float32.
Values stay float between the steps (torchvision rounds to uint8 after each one).
"""

from __future__ import annotations

import math

import numpy as np

from data_pipeline.augment import _RGB, _YIQ, blur_kernel
from data_pipeline.config import LoaderConfig

GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
BIAS = 1 << 14  # keeps source coordinates positive (int() then floors); images are smaller


def make_kernel(mean, std, window: int):
    """The kernel `run(out, img, p)` for one normalisation and blur window, as a plain Python
    function that Numba compiles (the closure's numbers become compile-time constants).
    out: (3, S, S) float32; img: (S, S, 3) uint8; p: the sample's augmentation parameters."""
    m0, m1, m2 = (255.0 * m for m in mean)
    s0, s1, s2 = (1.0 / (255.0 * s) for s in std)
    g0, g1, g2 = GREY
    (y00, y01, y02), (y10, y11, y12), (y20, y21, y22) = _YIQ.tolist()
    (r00, r01, r02), (r10, r11, r12), (r20, r21, r22) = _RGB.tolist()
    half = window // 2
    TOP = np.float32(255.0)
    from numba import njit

    clamp = njit(inline="always")(_clamp)
    reflect = njit(inline="always")(_reflect)

    def kernel(out, img, p):
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
            # source of output pixel x = 0 in padded coordinates (+1), biased by +BIAS so that
            # int() truncation is floor(); each step in x adds (ca, sa)
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
                    g0_ = pad[1, y0, x0] + fx * (pad[1, y0, x0 + 1] - pad[1, y0, x0])
                    g1_ = pad[1, y0 + 1, x0] + fx * (pad[1, y0 + 1, x0 + 1] - pad[1, y0 + 1, x0])
                    b0 = pad[2, y0, x0] + fx * (pad[2, y0, x0 + 1] - pad[2, y0, x0])
                    b1 = pad[2, y0 + 1, x0] + fx * (pad[2, y0 + 1, x0 + 1] - pad[2, y0 + 1, x0])
                    r, g, b = r0 + fy * (r1 - r0), g0_ + fy * (g1_ - g0_), b0 + fy * (b1 - b0)
                sx += ca
                sy += sa
                # values are >= 0 here: only the top needs clamping (in float32: half the cost)
                r, g, b = min(bright * r, TOP), min(bright * g, TOP), min(bright * b, TOP)
                out[0, y, xo], out[1, y, xo], out[2, y, xo] = r, g, b
                xo += step
                grey_sum += g0 * r + g1 * g + g2 * b
        # 2. contrast about the mean grey, saturation, hue; a flat loop without branches, which
        # the compiler vectorises. The hue turn is always applied (identity at 0 degrees).
        con, sat = p[7], p[8]
        offset = (1.0 - con) * grey_sum / (h * w)
        t = math.radians(-p[9])
        ct, st = math.cos(t), math.sin(t)
        # H = RGB<-YIQ . turn(I, Q) . YIQ<-RGB
        i0_, i1_, i2_ = ct * y10 - st * y20, ct * y11 - st * y21, ct * y12 - st * y22
        q0_, q1_, q2_ = st * y10 + ct * y20, st * y11 + ct * y21, st * y12 + ct * y22
        h00, h01, h02 = r00 * y00 + r01 * i0_ + r02 * q0_, r00 * y01 + r01 * i1_ + r02 * q1_, r00 * y02 + r01 * i2_ + r02 * q2_
        h10, h11, h12 = r10 * y00 + r11 * i0_ + r12 * q0_, r10 * y01 + r11 * i1_ + r12 * q1_, r10 * y02 + r11 * i2_ + r12 * q2_
        h20, h21, h22 = r20 * y00 + r21 * i0_ + r22 * q0_, r20 * y01 + r21 * i1_ + r22 * q1_, r20 * y02 + r21 * i2_ + r22 * q2_
        blur = p[10] > 0
        # normalise here, or after the blur
        norm = (0.0, 0.0, 0.0, 1.0, 1.0, 1.0) if blur else (m0, m1, m2, s0, s1, s2)
        colour(out.reshape(-1), h * w, con, sat, offset, (h00, h01, h02, h10, h11, h12, h20, h21, h22), norm)
        if not blur:
            return
        # 3. separable Gaussian blur (reflect border), then normalise
        kern = np.empty(window)
        sigma = p[10]
        total = 0.0
        for k in range(window):
            kern[k] = math.exp(-0.5 * ((k - half) / sigma) ** 2)
            total += kern[k]
        for k in range(window):
            kern[k] /= total
        pad = np.empty(max(h, w) + 2 * half)  # one reflect-padded row or column
        for c in range(3):
            for y in range(h):
                for k in range(w + 2 * half):
                    pad[k] = out[c, y, reflect(k - half, w)]
                for x in range(w):
                    acc = 0.0
                    for k in range(window):
                        acc += kern[k] * pad[x + k]
                    out[c, y, x] = acc
            for x in range(w):
                for k in range(h + 2 * half):
                    pad[k] = out[c, reflect(k - half, h), x]
                for y in range(h):
                    acc = 0.0
                    for k in range(window):
                        acc += kern[k] * pad[y + k]
                    out[c, y, x] = acc
        for y in range(h):
            for x in range(w):
                out[0, y, x] = (out[0, y, x] - m0) * s0
                out[1, y, x] = (out[1, y, x] - m1) * s1
                out[2, y, x] = (out[2, y, x] - m2) * s2

    def colour(flat, n, con, sat, offset, hue, norm):
        """Contrast about the mean grey, saturation, hue turn and normalisation, per pixel of
        the planar image `flat`: a loop without branches, which the compiler vectorises (as a
        function of its own: inlined into the kernel, the loop ran 6x slower)."""
        h00, h01, h02, h10, h11, h12, h20, h21, h22 = hue
        n0, n1, n2, k0, k1, k2 = norm
        for k in range(n):
            r = clamp(con * flat[k] + offset)
            g = clamp(con * flat[k + n] + offset)
            b = clamp(con * flat[k + 2 * n] + offset)
            grey = (1.0 - sat) * (g0 * r + g1 * g + g2 * b)
            r, g, b = clamp(sat * r + grey), clamp(sat * g + grey), clamp(sat * b + grey)
            flat[k] = (clamp(h00 * r + h01 * g + h02 * b) - n0) * k0
            flat[k + n] = (clamp(h10 * r + h11 * g + h12 * b) - n1) * k1
            flat[k + 2 * n] = (clamp(h20 * r + h21 * g + h22 * b) - n2) * k2

    colour = njit(fastmath=True)(colour)
    kernel = njit(fastmath=True)(kernel)

    def run(out, img, p):  # DALI compiles this one without fastmath; the call keeps the kernel's
        kernel(out, img, p)

    return run


def _clamp(v):
    return min(255.0, max(0.0, v))


def _reflect(i: int, n: int) -> int:
    """torchvision's 'reflect' padding index (the edge pixel is not repeated)."""
    if n == 1:
        return 0
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def _shape(outs, ins):
    """numba_function setup: output (3, H, W) for an (H, W, 3) input."""
    for i in range(len(outs[0])):
        outs[0][i][0] = 3
        outs[0][i][1] = ins[0][i][0]
        outs[0][i][2] = ins[0][i][1]


def fused_augment(img, params, cfg: LoaderConfig):
    """DALI node: resized uint8 HWC images + parameters → augmented, normalised CHW float."""
    from nvidia.dali import types
    from nvidia.dali.plugin.numba.fn.experimental import numba_function

    run = make_kernel(cfg.mean, cfg.std, blur_kernel(cfg.augment.scaled().blur_sigma[1]))
    return numba_function(img, params, run_fn=run, setup_fn=_shape, out_types=[types.FLOAT],
                          in_types=[types.UINT8, types.FLOAT], outs_ndim=[3], ins_ndim=[3, 1])
