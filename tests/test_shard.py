"""`agescale shard` / `agescale verify` on real UTKFace images, through the CLI."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import fixtures
from conftest import run_cli
from data_pipeline.tarshard import member_header
from data_pipeline.verify import verify_shards


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def all_keys(out: Path) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for split in manifest(out)["splits"]:
        for tar in sorted((out / split).glob("*.tar")):
            with tarfile.open(tar) as tf:
                keys.setdefault(split, []).extend(m.name.split(".")[0] for m in tf if m.name.endswith(".json"))
    return keys


def test_full_shared_set_counts_add_up(utk_shards, shared_utkface):
    m = manifest(utk_shards)
    assert m["total"]["count"] == 6000 and m["rejected"] == []
    assert set(m["splits"]) == {"train", "val", "test"}
    assert sum(s["count"] for s in m["splits"].values()) == 6000
    for name, split in m["splits"].items():
        assert sum(sh["samples"] for sh in split["shards"]) == split["count"]
        assert sum(split["age_bins"].values()) == split["count"]
        assert len(split["shards"]) == m["shard_policy"]["shards_per_split"][name] >= 8
        sizes = [sh["samples"] for sh in split["shards"]]
        assert max(sizes) - min(sizes) <= 1
    keys = all_keys(utk_shards)
    flat = [k for ks in keys.values() for k in ks]
    assert len(flat) == len(set(flat)) == 6000          # every image once, in one split only
    assert m["splits"]["train"]["count"] == pytest.approx(4800, abs=10)
    assert m["total"]["gender"] == {"male": 3108, "female": 2892}  # the shared README's counts
    assert (utk_shards / "config.yaml").exists()


def test_manifest_age_statistics_equal_the_statistics_module(utk_shards, shared_utkface):
    """The sharder computes mean, std and bins in floats for speed; they must read as the exact
    `statistics` results would, from the shared manifest CSV's ages."""
    import csv
    import statistics

    ages = [float(row["age"]) for row in csv.DictReader((shared_utkface.parent / "utkface_manifest.csv").open())]
    age = manifest(utk_shards)["total"]["age"]
    assert age["mean"] == round(statistics.fmean(ages), 4) and age["std"] == round(statistics.pstdev(ages), 4)
    assert age["median"] == statistics.median(ages) and (age["min"], age["max"]) == (min(ages), max(ages))
    bins = manifest(utk_shards)["total"]["age_bins"]
    assert bins["20-29"] == sum(20 <= a < 30 for a in ages) and bins["100+"] == sum(a >= 100 for a in ages)


def test_splits_are_stratified_by_age(utk_shards):
    m = manifest(utk_shards)
    total = m["total"]["age_bins"]
    for name, ratio in m["splits_requested"].items():
        for b, n in total.items():
            assert m["splits"][name]["age_bins"][b] == pytest.approx(n * ratio, abs=1.5), (name, b)


def test_labels_component_matches_json_and_file_name(utk_shards, shared_utkface):
    tar = sorted((utk_shards / "val").glob("*.tar"))[0]
    ds = wds.WebDataset(str(tar), shardshuffle=False)
    n = 0
    for sample in ds:
        meta = json.loads(sample["json"])
        age, gender, race = np.frombuffer(sample["labels.f32"], dtype="<f4")
        assert (age, gender, race) == (meta["age"], meta["gender"], meta["race"])
        assert meta["original_id"].startswith(f"{int(age)}_{int(gender)}_{int(race)}_")
        assert sample["jpg"] == (shared_utkface / meta["original_id"]).read_bytes()  # original bytes
        n += 1
    assert n == manifest(utk_shards)["splits"]["val"]["shards"][0]["samples"]


def test_sharding_twice_gives_identical_shards(utk_shards, shared_utkface, tmp_path):
    run_cli("shard", "--dataset", "utkface", "--src", shared_utkface, "--out", tmp_path / "again", check=True)
    a, b = manifest(utk_shards), manifest(tmp_path / "again")
    shas = lambda m: {(s, sh["tar"]): (sh["sha256"], sh["index_sha256"])  # noqa: E731
                      for s, v in m["splits"].items() for sh in v["shards"]}
    assert shas(a) == shas(b) and len(shas(a)) == 24
    for (split, name), _ in shas(a).items():
        assert (utk_shards / split / name).read_bytes() == (tmp_path / "again" / split / name).read_bytes()


def test_another_seed_changes_the_split(utk_shards, shared_utkface, tmp_path):
    run_cli("shard", "--dataset", "utkface", "--src", shared_utkface, "--out", tmp_path / "s1", "--seed", "1",
            check=True)
    assert set(all_keys(utk_shards)["test"]) != set(all_keys(tmp_path / "s1")["test"])


def test_verify_passes_then_names_altered_truncated_and_missing_shards(utk_shards_copy):
    ok = run_cli("verify", utk_shards_copy)
    assert ok.returncode == 0 and "24 shards OK" in ok.stdout

    altered = utk_shards_copy / "train" / "train-000002.tar"
    data = bytearray(altered.read_bytes())
    data[5000] ^= 0x01
    altered.write_bytes(bytes(data))
    truncated = utk_shards_copy / "val" / "val-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[:-3000])
    (utk_shards_copy / "test" / "test-000004.tar").unlink()
    idx = utk_shards_copy / "test" / "test-000005.idx"
    idx.write_text(idx.read_text().replace(" 512 ", " 1024 ", 1))

    bad = run_cli("verify", utk_shards_copy)
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert any("train/train-000002.tar: sha256 differs" in l for l in lines)
    assert any("val/val-000001.tar: size" in l for l in lines)
    assert any("test/test-000004.tar: missing" in l for l in lines)
    assert any("test/test-000005.idx" in l for l in lines)
    assert len(lines) == 5  # truncation also breaks reading the tar: two lines for val-000001


def test_verify_without_or_with_a_broken_manifest_is_one_line_error(tmp_path):
    r = run_cli("verify", tmp_path)
    assert r.returncode == 2 and "manifest.json: missing" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "manifest.json").write_text('{"splits": {"train": {"shards": [{"tar": "x"}]}}}')
    r = run_cli("verify", tmp_path)
    assert r.returncode == 2 and "not an agescale manifest" in r.stderr and r.stderr.count("\n") == 1


def test_out_that_is_a_file_is_one_line_error(tmp_path, sample_jpegs):
    (tmp_path / "out").write_text("")
    r = run_cli("shard", "--dataset", "utkface", "--src", sample_jpegs[0].parent, "--out", tmp_path / "out")
    assert r.returncode == 2 and "is a file, not a directory" in r.stderr


def test_bad_files_are_listed_and_the_rest_sharded(tmp_path, sample_jpegs):
    src = tmp_path / "src"
    for f in sample_jpegs[:40]:
        fixtures.put(f, src / f.name)
    good = sample_jpegs[40]
    (src / good.name).write_bytes(good.read_bytes()[:1500])            # truncated JPEG, valid name
    fixtures.put(sample_jpegs[41], src / "26_1_20170116174525125.jpg.chip.jpg")  # no race field
    (src / "30_0_1_20170116174525125.jpg.chip.jpg").write_bytes(b"not a jpeg at all")
    fixtures.put(sample_jpegs[42], src / "131_0_1_20170116174525125.jpg.chip.jpg")  # age out of range
    out = tmp_path / "out"
    r = run_cli("shard", "--dataset", "utkface", "--src", src, "--out", out, "--splits", "train=0.5,test=0.5",
                "data.shard.min_shards_per_split=2")
    assert r.returncode == 0, r.stderr
    m = manifest(out)
    reasons = {x["input"]: x["reason"] for x in m["rejected"]}
    assert set(reasons) == {good.name, "26_1_20170116174525125.jpg.chip.jpg",
                            "30_0_1_20170116174525125.jpg.chip.jpg", "131_0_1_20170116174525125.jpg.chip.jpg"}
    assert "undecodable image" in reasons[good.name] and "truncated" in reasons[good.name]
    assert "bad file name" in reasons["26_1_20170116174525125.jpg.chip.jpg"]
    assert "undecodable" in reasons["30_0_1_20170116174525125.jpg.chip.jpg"]
    assert "outside [0, 120]" in reasons["131_0_1_20170116174525125.jpg.chip.jpg"]
    assert m["total"]["count"] == 40 and sum(s["count"] for s in m["splits"].values()) == 40
    assert sorted(k for ks in all_keys(out).values() for k in ks) == sorted(
        f"utkface-{f.name.split('.')[0]}" for f in sample_jpegs[:40])
    assert run_cli("verify", out).returncode == 0


def test_source_with_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "hello.jpg").write_bytes(b"x")
    r = run_cli("shard", "--dataset", "utkface", "--src", tmp_path / "src", "--out", tmp_path / "out")
    assert r.returncode == 2 and "no usable utkface samples" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--splits", "train=0.8,val=0.3"], "add up to 1"),
    (["--splits", "train"], "expected NAME=RATIO"),
    (["data.shard.max_sample_per_shard=3"], "unknown config key 'data.shard.max_sample_per_shard'"),
    (["--src", "/nonexistent/faces"], "--src /nonexistent/faces: no such file or directory"),
])
def test_user_errors_are_one_line(tmp_path, args, message):
    base = ["shard", "--dataset", "utkface", "--out", tmp_path / "o"]
    if "--src" not in args:
        base += ["--src", tmp_path]
    r = run_cli(*base, *args)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr and "Traceback" not in r.stderr


def test_single_split_and_combined_datasets(tmp_path, sample_jpegs):
    fg = tmp_path / "fgnet"
    fixtures.fgnet(fg, sample_jpegs[100:])
    utk = tmp_path / "utk"
    for f in sample_jpegs[:30]:
        fixtures.put(f, utk / f.name)
    out = tmp_path / "out"
    run_cli("shard", "--dataset", "utkface", "--src", utk, "--dataset", "fgnet", "--src", fg,
            "--out", out, "--splits", "test=1", check=True)
    m = manifest(out)
    assert list(m["splits"]) == ["test"] and m["splits"]["test"]["sources"] == {"fgnet": 24, "utkface": 30}
    assert [s["dataset"] for s in m["sources"]] == ["utkface", "fgnet"]
    sources = Counter()
    for sample in wds.WebDataset([str(p) for p in sorted((out / "test").glob("*.tar"))], shardshuffle=False):
        sources[json.loads(sample["json"])["source"]] += 1
    assert sources == {"fgnet": 24, "utkface": 30}


def test_subject_disjoint_splits(tmp_path, sample_jpegs):
    fixtures.fgnet(tmp_path / "fg", sample_jpegs)
    out = tmp_path / "out"
    run_cli("shard", "--dataset", "fgnet", "--src", tmp_path / "fg", "--out", out, "--splits",
            "train=0.5,test=0.5", "data.shard.min_shards_per_split=1", check=True)
    subjects = {}
    for split in ("train", "test"):
        for s in wds.WebDataset([str(p) for p in (out / split).glob("*.tar")], shardshuffle=False):
            subjects.setdefault(split, set()).add(json.loads(s["json"])["subject"])
    assert subjects["train"] and subjects["test"] and not subjects["train"] & subjects["test"]


def test_max_side_shrinks_large_photos(tmp_path, sample_jpegs):
    src = tmp_path / "src"
    src.mkdir()
    big = Image.open(sample_jpegs[0]).resize((900, 600))
    for i in range(4):
        big.save(src / f"{20 + i}_0_0_2017011617452512{i}.jpg", quality=90)
    out = tmp_path / "out"
    run_cli("shard", "--dataset", "utkface", "--src", src, "--out", out, "--splits", "test=1", "--max-side", "300",
            check=True)
    for s in wds.WebDataset([str(p) for p in (out / "test").glob("*.tar")], shardshuffle=False):
        assert Image.open(io.BytesIO(s["jpg"])).size == (300, 200)
        assert (json.loads(s["json"])["width"], json.loads(s["json"])["height"]) == (300, 200)


def test_out_dir_is_never_silently_replaced(tmp_path, sample_jpegs):
    src = tmp_path / "src"
    for f in sample_jpegs[:10]:
        fixtures.put(f, src / f.name)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    args = ["shard", "--dataset", "utkface", "--src", src, "--out", tmp_path / "out", "--splits", "test=1"]
    assert "not empty" in run_cli(*args).stderr
    assert "no manifest.json" in run_cli(*args, "--overwrite").stderr
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("name, size", [("k.jpg", 0), ("utkface-1_0_0_20170110153026621.labels.f32", 12),
                                        ("a-b.json", 511), ("x" * 98 + ".j", 8 ** 11 - 1), ("y" * 120 + ".png", 7)])
def test_member_header_is_tarfiles_own(name, size):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = size, 0, 0o444, "agescale", "agescale"
    assert member_header(name, size) == ti.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def test_verify_api_reports_extra_files(utk_shards_copy):
    (utk_shards_copy / "train" / "stray.tar").write_bytes(b"")
    problems, n = verify_shards(utk_shards_copy)
    assert n == 24 and problems == ["train/stray.tar: not in the manifest"]


def test_a_resumed_shard_is_kept_only_while_its_inputs_are_unchanged(tmp_path, sample_jpegs):
    """A resume keeps a shard by its inputs' path, size and mtime (no hashing pass over the
    inputs before writing); an input rewritten since then gives its shard another fingerprint."""
    import os

    from data_pipeline.records import FaceRecord
    from data_pipeline.shard import FORMAT_VERSION, ShardJob
    from data_pipeline.shard_exec import fingerprint

    src = sample_jpegs[:3]
    copies = []
    for f in src:
        copies.append(tmp_path / f.name)
        copies[-1].write_bytes(f.read_bytes())
    job = ShardJob(tmp_path / "train-000000.tar", "train",
                   [(f"k{i}", FaceRecord(image=p, age=30.0, source="utkface", original_id=p.name))
                    for i, p in enumerate(copies)], None, 95)
    before = fingerprint(job, FORMAT_VERSION)
    assert fingerprint(job, FORMAT_VERSION) == before                 # stable
    copies[1].write_bytes(src[0].read_bytes())                       # other bytes in the same file
    os.utime(copies[1], ns=(1, 1))
    assert fingerprint(job, FORMAT_VERSION) != before


def test_colliding_keys_get_suffixes_in_source_and_id_order():
    """The documented rule: `sample_key`, then _2, _3, ... for the later of colliding keys in
    (source, original id) order, ties in collection order. Written out here as the plain sort
    of every record the driver no longer does (it sorts only the collisions)."""
    from data_pipeline.record_table import RecordTable
    from data_pipeline.records import FaceRecord, sample_key
    from data_pipeline.shard import _unique_keys

    ids = [("utk", "b.png"), ("utk", "x/a.jpg"), ("fg", "a.jpg"), ("utk", "a.jpg"), ("utk", "x_a.jpg"),
           ("utk", "a.png"), ("utk", "a.jpg"), ("utk", "c.jpg"), ("utk", "b.jpg"), ("utk", "a.jpeg")]
    table = RecordTable()
    for n, (source, rid) in enumerate(ids):
        table.append(FaceRecord(image=Path("/d") / rid, age=20 + n, source=source, original_id=rid), n % 2)
    seen: Counter[str] = Counter()
    expected = [""] * len(ids)
    for i in sorted(range(len(ids)), key=lambda i: ids[i]):
        key = sample_key(*ids[i])
        seen[key] += 1
        expected[i] = key if seen[key] == 1 else f"{key}_{seen[key]}"
    got = [k.decode() for k in _unique_keys(table)]
    assert got == expected
    assert got[9] == "utk-a" and [got[3], got[6], got[5]] == ["utk-a_2", "utk-a_3", "utk-a_4"]  # a.jpeg < a.jpg < a.png
    assert (got[1], got[4], got[2]) == ("utk-x_a", "utk-x_a_2", "fg-a")
    assert len(set(got)) == len(got)


@pytest.mark.parametrize("groups", [[b"c", b"a", b"b", b"e"], [b"s/1", b"a", b"s/1", b"b", b"a"], []])
def test_group_index_is_what_np_unique_gives(groups):
    """The split's group numbering (argsort ranks for unique keys, np.unique otherwise) and the
    split permutation equal the plain versions they replace."""
    import random
    from data_pipeline.split import _group_index, _permutation
    arr = np.array(groups, dtype="S4")
    _, inverse, counts = np.unique(arr, return_inverse=True, return_counts=True)
    group_of, sizes = _group_index(arr, block=2)
    assert group_of.tolist() == inverse.tolist() and sizes.tolist() == counts.tolist()
    order = list(range(len(groups)))
    random.Random("0/train").shuffle(order)
    assert _permutation(len(groups), random.Random("0/train")).tolist() == order


def _full_decode_fails(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return False
    except Exception:
        return True


def test_decode_check_rejects_what_a_full_decode_rejects(sample_jpegs, monkeypatch):
    """The sharder checks a JPEG it keeps as it is at 1/8 scale (images.prepare_image): damaged
    files (truncated, bytes changed, a range zeroed; baseline, progressive and with restart
    markers) must fail it exactly when a full decode fails."""
    import random

    from PIL import JpegImagePlugin

    from data_pipeline.images import prepare_image

    drafts = []
    real_draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda im, *a: drafts.append(1) or real_draft(im, *a))
    rng = random.Random(0)
    verdicts = Counter()
    for n, f in enumerate(sample_jpegs[:36]):
        data = f.read_bytes()
        if n % 3:  # re-encoded as progressive / with a restart marker every row of blocks
            buf = io.BytesIO()
            Image.open(f).save(buf, "JPEG", quality=90, **({"progressive": True} if n % 3 == 1 else
                                                          {"restart_marker_rows": 1}))
            data = buf.getvalue()
        damaged = [data[: rng.randrange(100, len(data))] for _ in range(3)]
        for _ in range(3):
            b = bytearray(data)
            for _ in range(rng.randrange(1, 20)):
                b[rng.randrange(2, len(b))] = rng.randrange(256)
            damaged.append(bytes(b))
        b = bytearray(data)
        start, size = rng.randrange(2, len(b) - 400), rng.randrange(1, 400)
        b[start:start + size] = bytes(size)
        damaged.append(bytes(b))
        for d in [data] + damaged:
            full, ours = _full_decode_fails(d), not prepare_image(d).ok
            assert full == ours, f"{f.name} ({n % 3}): a full decode {'fails' if full else 'passes'}, the check disagrees"
            verdicts[full] += 1
    assert verdicts[True] > 60 and verdicts[False] > 60  # both kinds of verdict are exercised
    assert len(drafts) >= 36  # the 1/8-scale path ran (at least once per intact file)
    kept = prepare_image(sample_jpegs[0].read_bytes())
    with Image.open(sample_jpegs[0]) as im:
        assert (kept.width, kept.height) == im.size and kept.data == sample_jpegs[0].read_bytes()
