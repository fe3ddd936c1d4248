"""Data-path reliability (issue 14): duplicate inputs, image modes, CSV rows with the wrong
number of fields, leftovers of an interrupted `agescale shard`, and unusable --out paths.

Everything runs on real files: UTKFace images from the shared data, shards written by the
`agescale shard` command, images of each mode written and re-read with Pillow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import fixtures
from conftest import run_cli
from data_pipeline.config import IngestConfig
from data_pipeline.datasets import create_dataset
from data_pipeline.datasets.utkface import parse_name
from base.image_modes import BACKGROUND, to_rgb
from data_pipeline.reader import ShardIndex
from data_pipeline.records import FaceRecord, Rejected

SMALL = ["data.shard.min_shards_per_split=2"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def split_images(out: Path) -> dict[str, list[bytes]]:
    """split → image bytes of every sample, read back from the tars."""
    images: dict[str, list[bytes]] = {}
    for split in manifest(out)["splits"]:
        for tar in sorted((out / split).glob("*.tar")):
            with tarfile.open(tar) as tf:
                images.setdefault(split, []).extend(
                    tf.extractfile(m).read() for m in tf if m.name.endswith((".jpg", ".png")))
    return images


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(r, *parts: str) -> None:
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    for part in parts:
        assert part in r.stderr, r.stderr


@pytest.fixture
def utk60(shared_utkface, tmp_path) -> Path:
    """60 real UTKFace images in a folder of their own."""
    src = tmp_path / "a"
    for f in sorted(shared_utkface.glob("*.jpg"))[:60]:
        fixtures.put(f, src / f.name)
    return src


# ---------------------------------------------------------------- 1. duplicate inputs

def test_duplicate_sources_are_stored_once_and_never_cross_splits(utk60, tmp_path):
    a = sorted(utk60.iterdir())
    b = tmp_path / "b"                          # 20 of A's files: 10 under their names, 10 renamed
    for k, f in enumerate(a[:20]):
        age, gender, race = parse_name(f.name)
        name = f.name if k < 10 else f"{age}_{gender}_{race}_{29990101000000000 + k}.jpg.chip.jpg"
        fixtures.put(f, b / name)
    c = tmp_path / "c"                          # another dataset (csv) holding 5 of them again
    rows = ["path,age"]
    for k, f in enumerate(a[20:25]):
        fixtures.put(f, c / "img" / f"face{k}.jpg")
        age = parse_name(f.name)[0] + (7 if k == 0 else 0)   # one copy with a different label
        rows.append(f"img/face{k}.jpg,{age}")
    (c / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    r = run_cli("shard", "--dataset", "utkface", "--src", utk60, "--dataset", "utkface", "--src", utk60,
                "--dataset", "utkface", "--src", b, "--dataset", "csv", "--src", c / "labels.csv",
                "--out", out, "--splits", "train=0.5,val=0.25,test=0.25", *SMALL)
    assert r.returncode == 0, r.stderr

    distinct = {sha(f.read_bytes()) for f in a}
    m = manifest(out)
    per_split = {s: [sha(x) for x in imgs] for s, imgs in split_images(out).items()}
    flat = [h for hs in per_split.values() for h in hs]
    assert len(flat) == len(set(flat)) == len(distinct) == m["total"]["count"]   # every image once
    assert set(flat) == distinct
    for s1 in per_split:                                                           # no leak
        for s2 in per_split:
            assert s1 == s2 or not set(per_split[s1]) & set(per_split[s2]), (s1, s2)

    dups = m["duplicates"]
    assert m["total"]["duplicates"] == len(dups) == 60 + 20 + 5
    assert [s["duplicates"] for s in m["sources"]] == [0, 60, 20, 5]
    assert [s["inputs"] for s in m["sources"]] == [60, 60, 20, 5]
    assert [s["sharded"] for s in m["sources"]] == [60, 0, 0, 0]                   # first --src wins
    assert {d["source"] for d in dups} == {str(f) for f in a} | {str(f) for f in b.iterdir()} | {
        str(f) for f in (c / "img").iterdir()}
    for d in dups:
        assert sha(Path(d["source"]).read_bytes()) == sha(Path(d["kept"]).read_bytes()) == d["sha256"]
        assert Path(d["kept"]).parent == utk60 and d["reason"].startswith(f"same content sha256 as {d['kept']}")
    relabelled = [d for d in dups if d["source"].endswith("face0.jpg")]
    assert "labels differ" in relabelled[0]["reason"]
    keys = [json.loads(x)["key"] for x in _jsons(out)]
    assert not any(k.endswith("_2") for k in keys)
    assert run_cli("verify", out).returncode == 0


def _jsons(out: Path) -> list[bytes]:
    found = []
    for tar in sorted(out.glob("*/*.tar")):
        with tarfile.open(tar) as tf:
            found += [tf.extractfile(m).read() for m in tf if m.name.endswith(".json")]
    return found


# ---------------------------------------------------------------- 2. image modes

def reopen(im: Image.Image, path: Path, fmt: str | None = None, **save) -> Image.Image:
    """Write `im` as a real file and open it again, as predict or the sharder would."""
    im.save(path, fmt, **save)
    return Image.open(path)


def gradient(dtype, lo, hi, shape=(16, 64)) -> np.ndarray:
    return np.tile(np.linspace(lo, hi, shape[1]), (shape[0], 1)).astype(dtype)


def assert_gradient(rgb: Image.Image) -> None:
    a = np.asarray(rgb)
    assert rgb.mode == "RGB" and a.dtype == np.uint8
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()       # still grey
    row = a[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all() and len(set(row)) > 50
    assert (a == a[:1]).all()                                                      # every row the same


@pytest.mark.parametrize("mode, fmt, values", [
    ("I;16", "PNG", gradient(np.uint16, 0, 4000)),            # narrow 16-bit range
    ("I;16B", "TIFF", gradient(">u2", 1000, 60000)),
    ("I", "TIFF", gradient(np.int32, -100_000, 3_000_000)),
    ("F", "TIFF", gradient(np.float32, -1.5, 2.5)),
])
def test_high_depth_images_are_stretched_to_8_bit(tmp_path, mode, fmt, values):
    im = reopen(Image.fromarray(values), tmp_path / f"g.{fmt.lower()}", fmt)
    assert im.mode == mode
    if mode == "I;16":
        assert (np.asarray(im.convert("RGB")) == 255).mean() > 0.9   # the defect: Pillow's own convert clips
    assert_gradient(to_rgb(im))


def test_constant_and_non_finite_high_depth_images(tmp_path):
    flat = reopen(Image.fromarray(np.full((8, 8), 1234, np.uint16)), tmp_path / "flat.png")
    assert flat.mode == "I;16" and (np.asarray(to_rgb(flat)) == 0).all()           # constant → black
    f = gradient(np.float32, 0, 1, (8, 8))
    f[0, 0], f[0, 1], f[0, 2] = np.nan, np.inf, -np.inf
    a = np.asarray(to_rgb(reopen(Image.fromarray(f), tmp_path / "nan.tiff")))[..., 0]
    assert (a[0, 0], a[0, 1], a[0, 2], a[0, 7]) == (0, 255, 0, 255) and a[1, 0] == 0


def _palette(transparency: bool) -> Image.Image:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([200, 10, 10, 10, 200, 10] + [0] * 762)
    im.paste(1, (8, 0, 16, 16))
    if transparency:
        im.info["transparency"] = 0                      # index 0 transparent
    return im


def _alpha(mode: str) -> Image.Image:
    """Left half opaque (200, 100, 50), right half half-transparent, as `mode`."""
    a = np.zeros((16, 16, 4), np.uint8)
    a[...] = (200, 100, 50, 255)
    a[:, 8:, 3] = 128
    im = Image.fromarray(a, "RGBA")
    return im if mode == "RGBA" else im.convert(mode)


def _over_bg(c, alpha):  # what compositing onto BACKGROUND gives, channel by channel
    return np.round(np.asarray(c, float) * alpha / 255 + np.asarray(BACKGROUND, float) * (1 - alpha / 255))


@pytest.mark.parametrize("mode, make, fmt, left, right", [
    ("1", lambda: Image.new("1", (16, 16), 1), "PNG", (255, 255, 255), (255, 255, 255)),
    ("L", lambda: Image.new("L", (16, 16), 77), "PNG", (77, 77, 77), (77, 77, 77)),
    ("P", lambda: _palette(False), "PNG", (200, 10, 10), (10, 200, 10)),
    ("P", lambda: _palette(True), "PNG", BACKGROUND, (10, 200, 10)),            # transparent → background
    ("RGBA", lambda: _alpha("RGBA"), "PNG", (200, 100, 50), _over_bg((200, 100, 50), 128)),
    ("LA", lambda: _alpha("LA"), "PNG", (124,) * 3, _over_bg((124,) * 3, 128)),
    ("PA", lambda: _alpha("LA").convert("RGBA").convert("PA"), None, (124,) * 3, _over_bg((124,) * 3, 128)),
    ("CMYK", lambda: Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "TIFF", (255, 0, 0), (255, 0, 0)),
    ("YCbCr", lambda: Image.new("YCbCr", (16, 16), (76, 85, 255)), None, (254, 0, 0), (254, 0, 0)),
    # Pillow's LAB holds a and b as signed bytes; Image.new would offset them, so raw bytes: L=100, a=b=0.
    ("LAB", lambda: Image.frombytes("LAB", (16, 16), bytes([255, 0, 0] * 256)), "TIFF", (255,) * 3, (255,) * 3),
    ("HSV", lambda: Image.new("HSV", (16, 16), (85, 255, 255)), None, (0, 255, 0), (0, 255, 0)),
])
def test_every_mode_becomes_the_right_rgb(tmp_path, mode, make, fmt, left, right):
    im = make()
    if fmt:  # written and read back where the format can hold the mode; in memory otherwise
        im = reopen(im, tmp_path / f"x.{fmt.lower()}", fmt)
    assert im.mode == mode
    a = np.asarray(to_rgb(im)).astype(int)
    assert a.shape == (16, 16, 3)
    assert np.abs(a[:, :8] - np.asarray(left)).max() <= 1 and np.abs(a[:, 8:] - np.asarray(right)).max() <= 1


def test_premultiplied_la_is_converted_too():
    la = Image.new("La", (8, 8), (100, 255))                 # Pillow itself cannot convert La to RGB
    assert (np.asarray(to_rgb(la)) == 100).all()


ODD_FILES = {  # name → writer; each a mode that the sharder may not store as it is
    "grey16.png": lambda p: Image.fromarray(gradient(np.uint16, 0, 4000, (48, 64))).save(p),
    "palette_alpha.png": lambda p: _palette(True).resize((32, 32)).save(p, transparency=0),
    "float.tiff": lambda p: Image.fromarray(gradient(np.float32, -1, 1, (40, 40))).save(p),
    "rgba.png": lambda p: _alpha("RGBA").resize((32, 32)).save(p),
    "cmyk.jpg": lambda p: Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(p, quality=95),
}


def test_shard_and_loader_store_what_to_rgb_makes_of_the_file(tmp_path, shared_utkface):
    src = tmp_path / "csv"
    rows = ["path,age"]
    for name, write in ODD_FILES.items():
        (src / "img").mkdir(parents=True, exist_ok=True)
        write(src / "img" / name)
        rows.append(f"img/{name},30")
    for k, f in enumerate(sorted(shared_utkface.glob("*.jpg"))[:3]):
        fixtures.put(f, src / "img" / f"face{k}.jpg")
        rows.append(f"img/face{k}.jpg,{parse_name(f.name)[0]}")
    (src / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    run_cli("shard", "--dataset", "csv", "--src", src / "labels.csv", "--out", out, "--splits", "test=1",
            "data.shard.min_shards_per_split=1", check=True)
    m = manifest(out)
    assert m["rejected"] == [] and m["total"]["count"] == len(rows) - 1
    index = ShardIndex(out, "test")
    metas = [json.loads(x) for x in _jsons(out)]              # one shard: the index's order
    assert [s.key for s in index.samples] == [x["key"] for x in metas]
    by_id = {x["original_id"]: i for i, x in enumerate(metas)}
    for name in ODD_FILES:
        with Image.open(src / "img" / name) as im:
            want = np.asarray(to_rgb(ImageOps.exif_transpose(im)))
        got = np.asarray(index.decode(by_id[f"img/{name}"]))
        tol = 3 if name.endswith(".jpg") else 0       # CMYK JPEG is re-encoded as JPEG; the rest losslessly
        assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= tol, name
    assert_gradient(index.decode(by_id["img/grey16.png"]))
    assert index.image_bytes(by_id["img/face0.jpg"]) == (src / "img" / "face0.jpg").read_bytes()  # kept as is


def test_predict_preprocesses_a_16_bit_png_as_the_loader_does(tmp_path):
    from serving.predict import Predictor

    path = tmp_path / "grey16.png"
    Image.fromarray(gradient(np.uint16, 0, 4000, (64, 64))).save(path)
    pred = Predictor.__new__(Predictor)                 # preprocess needs only the bundle's preprocess.json
    pred.pre = {"exif_orientation": True, "resize": {"shorter_side": 40}, "center_crop": [32, 32],
                "scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    with Image.open(path) as im:
        as_predicted = pred.preprocess(im)
    with Image.open(path) as im:
        as_loaded = pred.preprocess(to_rgb(ImageOps.exif_transpose(im)))
    np.testing.assert_array_equal(as_predicted, as_loaded)
    pixels = as_predicted * 0.25 + 0.5                    # back to 0..1: a gradient, not a white square
    assert pixels.min() < 0.2 and pixels.max() > 0.8      # (the centre crop keeps 0.1..0.9 of it)


# ---------------------------------------------------------------- 3. CSV rows with the wrong field count

def read_csv(path: Path) -> tuple[list[FaceRecord], list[Rejected]]:
    items = list(create_dataset("csv", path, IngestConfig()))
    return [i for i in items if isinstance(i, FaceRecord)], [i for i in items if isinstance(i, Rejected)]


def test_csv_rows_with_more_or_fewer_fields_are_rejected_with_their_line(tmp_path, sample_jpegs):
    for n in "abcd":
        fixtures.put(sample_jpegs[0], tmp_path / f"{n}.jpg")
    (tmp_path / "labels.csv").write_text(
        "path,age,gender\n"
        "a.jpg,30,m\n"
        "b.jpg,31,f,extra\n"                      # line 3: one field too many
        '"c\nd.jpg",32,m\n'                       # lines 4-5: a quoted field spanning two lines
        "c.jpg,33\n"                              # line 6: one field short
        "\n"
        "d.jpg,34,f\n")
    recs, rej = read_csv(tmp_path / "labels.csv")
    assert [(r.original_id, r.age) for r in recs] == [("a.jpg", 30), ("d.jpg", 34)]
    reasons = {r.input: r.reason for r in rej}
    assert reasons["b.jpg"] == "labels.csv line 3: 4 fields, expected 3 (path,age,gender)"
    assert reasons["c.jpg"] == "labels.csv line 6: 2 fields, expected 3 (path,age,gender)"
    assert reasons["c\nd.jpg"].startswith("labels.csv line 4: image file")      # line where the row starts

    (tmp_path / "plain.csv").write_text("a.jpg,30,1,0,s1\nb.jpg,30,1,0,s1,oops\nc.jpg\n")
    recs, rej = read_csv(tmp_path / "plain.csv")
    assert [r.original_id for r in recs] == ["a.jpg"]
    assert sorted(r.reason for r in rej) == [
        "plain.csv line 2: 6 fields, expected 2-5 (path,age,gender,race,subject)",
        "plain.csv line 3: 1 fields, expected 2-5 (path,age,gender,race,subject)"]


# ---------------------------------------------------------------- 4. interrupted shard vs --overwrite

def _shard(src: Path, out: Path, *extra: str):
    return run_cli("shard", "--dataset", "utkface", "--src", src, "--out", out,
                   "--splits", "train=0.5,test=0.5", *SMALL, *extra)


def _interrupted(clean: Path, out: Path) -> None:
    """What a run killed while writing leaves: shards, one .tar.partial, no manifest yet."""
    shutil.copytree(clean, out)
    (out / "manifest.json").unlink()
    (out / "config.yaml").unlink()
    tar = sorted((out / "train").glob("*.tar"))[-1]
    tar.with_suffix(".idx").unlink()
    tar.rename(tar.with_name(tar.name + ".partial"))
    (out / "manifest.json.partial").write_text('{"format_v')
    (out / "val").mkdir()                                      # from a run with other --splits
    (out / "val" / "val-000000.tar.partial").write_bytes(b"\0" * 1024)


def test_overwrite_clears_what_an_interrupted_shard_left(utk60, tmp_path):
    clean = tmp_path / "clean"
    assert _shard(utk60, clean).returncode == 0
    out = tmp_path / "out"
    _interrupted(clean, out)
    one_line_error(_shard(utk60, out), "not empty", "--overwrite")
    r = _shard(utk60, out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert tree(out) == tree(clean)                           # byte for byte what a clean run writes

    # A finished set with strays beside it: also replaced by exactly the clean result.
    (out / "train" / "train-000003.tar.partial").write_bytes(b"x")
    (out / "manifest.json.partial").write_text("{")
    assert _shard(utk60, out, "--overwrite").returncode == 0 and tree(out) == tree(clean)


def test_overwrite_still_keeps_user_files(utk60, tmp_path):
    clean = tmp_path / "clean"
    assert _shard(utk60, clean).returncode == 0
    out = tmp_path / "out"
    _interrupted(clean, out)
    (out / "notes.partial").write_text("mine")                 # not a name the sharder writes
    (out / "train" / "notes.txt").write_text("mine")
    before = tree(out)
    one_line_error(_shard(utk60, out, "--overwrite"), "holds no manifest.json", "refusing to delete",
                   "notes.partial")
    assert tree(out) == before                                 # nothing deleted
    # With a manifest, files beside the shard set stay as they are (the rule before this fix).
    clean2 = tmp_path / "clean2"
    assert _shard(utk60, clean2).returncode == 0
    (clean2 / "README.txt").write_text("mine")
    assert _shard(utk60, clean2, "--overwrite").returncode == 0
    assert (clean2 / "README.txt").read_text() == "mine"


# ---------------------------------------------------------------- 5. unusable --out

def test_out_that_is_or_lies_under_a_file(utk60, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("")
    one_line_error(_shard(utk60, f), f"--out {f}: is a file, not a directory")
    one_line_error(_shard(utk60, f / "sub" / "out"), f"--out {f / 'sub' / 'out'}: {f} is a file, so no directory can be made under it")
    assert f.read_text() == ""


def _cannot_create_in(folder: Path) -> bool:
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return True
    return False


def test_out_that_is_not_writable(utk60, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if _cannot_create_in(locked):
            where = locked
        elif _cannot_create_in(Path("/sys")):  # root ignores the mode bits; sysfs refuses even root
            where = Path("/sys")
        else:
            pytest.skip("cannot make a folder this user is unable to write to")
        one_line_error(_shard(utk60, where / "out"), f"--out {where / 'out'}: cannot write in {where}")  # to create
        one_line_error(_shard(utk60, where), f"--out {where}: cannot write in {where}")                # existing
    finally:
        os.chmod(locked, 0o700)
