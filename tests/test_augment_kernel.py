"""The fused CPU augmentation kernel (DALI's CPU mode) against exact references on a real face:
numpy for the geometry, torchvision's functional ops in float32 for everything else.

Float, not uint8: on uint8 images torchvision truncates after every step (~0.5 grey level of
bias each), which would hide errors of that size. tests/test_loader.py compares the loaders
themselves (uint8 torchvision against this kernel) knob by knob."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from data_pipeline.augment import IDENTITY, blur_kernel, yiq_hue_matrix
from data_pipeline.augment_kernel import augment, kernel_constants
from data_pipeline.config import LoaderConfig

S = 112
CFG = LoaderConfig()  # default policy: every knob on, blur window from blur_sigma
SLOT = dict(flip=4, angle=5, brightness=6, contrast=7, saturation=8, hue=9, blur=10)


@pytest.fixture(scope="module")
def kernel():
    """The kernel with the constants DALI hands it (float32), called straight from Python."""
    c = kernel_constants(CFG.mean, CFG.std, blur_kernel(CFG.augment.blur_sigma[1]))
    norm, window = tuple(c[:6]), int(c[6])
    return lambda out, img, p: augment(out, img, p, norm, window)


@pytest.fixture(scope="module")
def face(sample_jpegs) -> Image.Image:
    return Image.open(sample_jpegs[3]).convert("RGB").resize((S, S), Image.BILINEAR)


def params(**knobs) -> np.ndarray:
    p = IDENTITY.copy()
    for k, v in knobs.items():
        p[SLOT[k]] = v
    return p


def pixels(normalised: np.ndarray) -> np.ndarray:
    """Back from normalised CHW to grey levels."""
    return normalised * (255 * np.array(CFG.std))[:, None, None] + (255 * np.array(CFG.mean))[:, None, None]


def fused(kernel, face: Image.Image, p: np.ndarray) -> np.ndarray:
    out = np.empty((3, S, S), np.float32)
    kernel(out, np.ascontiguousarray(np.asarray(face)), p)
    return pixels(out)


def reference(face: Image.Image, p: np.ndarray) -> np.ndarray:
    """torchvision in float32, in the kernel's order, in grey levels."""
    img = F.to_dtype(F.to_image(face), torch.float32, scale=True)
    # fill=None: taps outside the image read 0 (grid_sample's zero padding), as in the kernel and
    # DALI. fill=0 would also multiply the 1-2 px border band by torchvision's interpolated
    # validity mask (its way to blend any fill colour), darkening that band a second time.
    img = F.rotate(img, float(p[5]), interpolation=InterpolationMode.BILINEAR, fill=None)
    img = F.adjust_brightness(img, float(p[6]))
    img = F.adjust_contrast(img, float(p[7]))
    img = F.adjust_saturation(img, float(p[8]))
    img = torch.einsum("ij,jhw->ihw", torch.from_numpy(yiq_hue_matrix(float(p[9]))).float(), img).clamp(0, 1)
    if p[10] > 0:
        k = blur_kernel(CFG.augment.blur_sigma[1])
        img = F.gaussian_blur(img, [k, k], [float(p[10])] * 2)
    if p[4]:
        img = F.horizontal_flip(img)
    return 255 * img.numpy()


def test_identity_flip_and_quarter_turn_are_exact(kernel, face):
    chw = np.asarray(face).transpose(2, 0, 1).astype(np.float64)
    assert np.abs(fused(kernel, face, params()) - chw).max() < 1e-3
    assert np.abs(fused(kernel, face, params(flip=1)) - chw[:, :, ::-1]).max() < 1e-3
    # +90 degrees is counter-clockwise, about the centre: pixel centres land on pixel centres
    assert np.abs(fused(kernel, face, params(angle=90)) - np.rot90(chw, 1, axes=(1, 2))).max() < 1e-2


CASES = {
    "rotate 30": dict(angle=30),
    "rotate -45, flip": dict(angle=-45, flip=1),
    "bright 1.8 (clips)": dict(brightness=1.8),
    "bright 1.8 then contrast 0.5": dict(brightness=1.8, contrast=0.5),
    "contrast 1.6": dict(contrast=1.6),
    "saturation 1.8": dict(saturation=1.8),
    "grayscale": dict(saturation=0),
    "hue +40": dict(hue=40),
    "hue -25": dict(hue=-25),
    "blur 1.3": dict(blur=1.3),
    "everything": dict(angle=12, flip=1, brightness=1.2, contrast=0.8, saturation=1.3, hue=-10, blur=0.8),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_torchvision(kernel, face, case):
    p = params(**CASES[case])
    ours, theirs = fused(kernel, face, p), reference(face, p)
    diff = np.abs(ours - theirs)
    assert diff.mean() < 0.02 and diff.max() < 0.5, f"{case}: mean {diff.mean():.3f}, max {diff.max():.2f} grey levels"
    unchanged = np.asarray(face).transpose(2, 0, 1)
    assert np.abs(theirs - unchanged).mean() > 1, f"{case} changed too little to test anything"


def test_clipping_happens_after_each_colour_step_like_torchvision(kernel, face):
    """Brightness 1.8 saturates highlights before contrast halves them; one affine map without
    the clip in between would bring them back (and miss torchvision by tens of grey levels)."""
    p = params(brightness=1.8, contrast=0.5)
    ours = fused(kernel, face, p)
    img = np.asarray(face).astype(np.float64).transpose(2, 0, 1)
    grey = (0.2989 * img[0] + 0.587 * img[1] + 0.114 * img[2]) * 1.8
    unclipped = 0.5 * 1.8 * img + 0.5 * grey.mean()
    bright = img.max(axis=0) * 1.8 > 300
    assert bright.mean() > 0.02, "the test face has too few highlights"
    assert np.abs(ours - unclipped)[:, bright].mean() > 10
    assert np.abs(ours - reference(face, p))[:, bright].max() < 0.5


def test_fused_is_cpu_only():
    with pytest.raises(ValueError, match="augment_ops=fused runs on the CPU only"):
        LoaderConfig(device="gpu", augment_ops="fused")
    assert LoaderConfig(device="gpu").augment_ops == "auto"


def test_the_dali_operator_runs_the_same_kernel_through_its_cached_c_wrapper(kernel, face):
    """fused_augment hands DALI the address of our own cfunc (DALI's C ABI) instead of a Python
    function for DALI to wrap: inside a real DALI pipeline it must give the kernel's exact output,
    per sample, for images of two sizes (each sample's own shape and parameters reach it)."""
    from nvidia.dali import fn, pipeline_def, types

    from data_pipeline.augment_kernel import fused_augment

    imgs = [np.ascontiguousarray(np.asarray(face)), np.ascontiguousarray(np.asarray(face.resize((48, 40))))]
    ps = [params(**CASES["everything"]), params(flip=1, brightness=1.3, saturation=0.6)]

    @pipeline_def(batch_size=2, num_threads=2, device_id=None)
    def pipe():
        img = fn.external_source(source=lambda: imgs, batch=True, dtype=types.UINT8, layout="HWC")
        p = fn.external_source(source=lambda: [q.astype(np.float32) for q in ps], batch=True, dtype=types.FLOAT)
        return fused_augment(img, p, CFG)

    pl = pipe()
    pl.build()
    (out,) = pl.run()
    for i, (img, p) in enumerate(zip(imgs, ps)):
        want = np.empty((3, *img.shape[:2]), np.float32)
        kernel(want, img, p.astype(np.float32))
        got = np.asarray(out[i])
        assert got.shape == want.shape and np.abs(want).max() > 0.5
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_a_new_process_loads_the_dali_wrapper_from_disk_instead_of_compiling_it():
    """DALI's own numba_function compiles its wrapper in every process (~4 s before the first
    batch); ours is compiled once per machine: a second process finds both cfuncs cached."""
    import subprocess
    import sys

    from conftest import REPO
    code = ("from data_pipeline import augment_kernel as k; "
            "print(k._run_cfunc.cache_hits, k._setup_cfunc.cache_hits)")
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1", "1"]
