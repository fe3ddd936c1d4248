"""Dataset adapters, each on a small fixture in the dataset's real on-disk format."""


import pytest

import fixtures
from data_pipeline.config import IngestConfig
from data_pipeline.datasets import create_dataset, list_datasets
from data_pipeline.datasets.utkface import parse_name
from data_pipeline.records import FaceRecord, Rejected
from base.errors import UserError


def read(name, src, **cfg):
    items = list(create_dataset(name, src, IngestConfig(**cfg)))
    return [i for i in items if isinstance(i, FaceRecord)], [i for i in items if isinstance(i, Rejected)]


def test_registry_lists_every_format():
    assert {a.name for a in list_datasets()} == {"utkface", "fgnet", "agedb", "appa_real", "imdb_wiki", "csv"}


@pytest.mark.parametrize("name, expected", [
    ("26_1_2_20170116174525125.jpg.chip.jpg", (26, 1, 2)),
    ("1_0_4_20161221193919588.jpg", (1, 0, 4)),
])
def test_utkface_names(name, expected):
    assert parse_name(name) == expected


@pytest.mark.parametrize("name, reason", [
    ("39_1_20170116174525125.jpg.chip.jpg", "expected 4"),          # no race field (real case)
    ("61_1_20170109150557335.jpg.chip.jpg", "expected 4"),
    ("53__0_20170116184028385.jpg.chip.jpg", "gender field ''"),
    ("24_0_1_20170116220224657 .jpg.chip.jpg", "datetime field"),    # a space (real case)
    ("26_2_2_20170116174525125.jpg.chip.jpg", "gender field '2'"),
    ("26_1_7_20170116174525125.jpg.chip.jpg", "race field '7'"),
    ("x_1_2_20170116174525125.jpg", "age field 'x'"),
])
def test_utkface_malformed_names_are_rejected_with_reason(name, reason):
    with pytest.raises(ValueError, match=reason):
        parse_name(name)


def test_fgnet(tmp_path, sample_jpegs):
    ages = fixtures.fgnet(tmp_path, sample_jpegs)
    (tmp_path / "notes.jpg").write_bytes(b"x")
    recs, rej = read("fgnet", tmp_path)
    assert {r.original_id: r.age for r in recs} == ages
    assert {r.subject for r in recs} == {f"{i:03d}" for i in range(1, 7)}
    assert [r.input for r in rej] == ["notes.jpg"] and "bad file name: expected SSSAyy" in rej[0].reason


def test_agedb(tmp_path, sample_jpegs):
    fixtures.agedb(tmp_path, sample_jpegs)
    recs, rej = read("agedb", tmp_path)
    got = {r.original_id: (r.age, r.gender, r.subject) for r in recs}
    assert got == {"0_MariaCallas_35_f.jpg": (35, 1, "MariaCallas"), "1_MariaCallas_40_f.jpg": (40, 1, "MariaCallas"),
                   "17_Jean_Reno_51_m.jpg": (51, 0, "Jean_Reno")}
    assert [r.input for r in rej] == ["bad_name.jpg"]


def test_appa_real_real_and_apparent_age(tmp_path, sample_jpegs):
    fixtures.appa_real(tmp_path, sample_jpegs)
    recs, rej = read("appa_real", tmp_path)
    assert {r.original_id: r.age for r in recs} == {"train/000000.jpg": 41, "train/000001.jpg": 19,
                                                   "valid/004113.jpg": 58}
    by_id = {r.original_id: r for r in recs}
    assert by_id["train/000000.jpg"].image.name == "000000.jpg_face.jpg"
    assert (by_id["train/000000.jpg"].gender, by_id["train/000000.jpg"].race) == (1, 2)
    assert by_id["valid/004113.jpg"].gender is None
    assert len(rej) == 1 and "real_age 'x' is not a number" in rej[0].reason
    recs, _ = read("appa_real", tmp_path, appa_real_age="apparent", appa_real_face_crops=False)
    assert {r.original_id: r.age for r in recs}["train/000001.jpg"] == pytest.approx(20.1)
    assert {r.original_id: r for r in recs}["train/000001.jpg"].image.name == "000001.jpg"


def test_imdb_wiki_ages_and_rejections(tmp_path, sample_jpegs):
    fixtures.imdb_wiki(tmp_path, sample_jpegs)
    recs, rej = read("imdb_wiki", tmp_path)
    got = {r.original_id: (r.age, r.gender, r.subject) for r in recs}
    assert got == {
        "imdb/01/nm01_rm1_1950-03-02_1990.jpg": (40, 0, "11"),   # born March: had birthday by 1 July
        "imdb/01/nm01_rm2_1950-03-02_2001.jpg": (51, 0, "11"),
        "imdb/02/nm02_rm1_1980-09-30_2000.jpg": (19, 1, "12"),   # born September: not yet 20 on 1 July
        "imdb/02/nm02_rm2_1980-09-30_2000.jpg": (19, None, "12"),
        "imdb/04/nm04_rm1.jpg": (-10, 0, "14"),                  # the sharder's age check rejects it
    }
    reasons = {r.input: r.reason for r in rej}
    assert "no face detected" in reasons["imdb/03/nm03_rm1.jpg"]
    assert "second face" in reasons["imdb/03/nm03_rm2.jpg"]
    assert "date of birth" in reasons["imdb/03/nm03_rm3.jpg"]
    assert "not found" in reasons["imdb/04/missing.jpg"]


def test_generic_csv(tmp_path, sample_jpegs):
    path = fixtures.generic_csv(tmp_path, sample_jpegs)
    recs, rej = read("csv", path)
    assert {(r.original_id, r.age, r.gender, r.subject) for r in recs} == {
        ("img/a.jpg", 23, 1, "s1"), ("img/b.jpg", -3, 0, "s2"), ("img/c.jpg", 41.5, None, "s3")}
    reasons = sorted(r.reason for r in rej)
    assert "line 5: image file 'img/missing.jpg' not found" in reasons[0]
    assert "line 6: gender 'x'" in reasons[1]


def test_csv_without_header_and_bad_header(tmp_path, sample_jpegs):
    fixtures.put(sample_jpegs[0], tmp_path / "a.jpg")
    (tmp_path / "plain.csv").write_text("a.jpg,30,1\n")
    recs, _ = read("csv", tmp_path / "plain.csv")
    assert [(r.age, r.gender) for r in recs] == [(30, 1)]
    (tmp_path / "latin1.csv").write_bytes("path,age\nJosé.jpg,30\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.csv: not UTF-8 text"):
        read("csv", tmp_path / "latin1.csv")
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfpath,age\na.jpg,31\n")
    assert [r.age for r in read("csv", tmp_path / "bom.csv")[0]] == [31]
    (tmp_path / "bad.csv").write_text("path,years\na.jpg,30\n")
    with pytest.raises(UserError, match="bad.csv: header lacks column"):
        read("csv", tmp_path / "bad.csv")


def test_missing_source_and_unknown_dataset(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read("utkface", tmp_path / "nope")
    with pytest.raises(UserError, match="unknown dataset 'morph'"):
        read("morph", tmp_path)
