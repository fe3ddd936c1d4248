"""Writers of small datasets in each format's real on-disk layout, using real face JPEGs."""

from __future__ import annotations

import csv
import datetime as dt
import shutil
from pathlib import Path

import numpy as np


def put(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def fgnet(root: Path, jpegs: list[Path]) -> dict[str, float]:
    """FG-NET names: 6 subjects x 4 photos, plus one lower-case variant with a letter suffix."""
    ages = {}
    it = iter(jpegs)
    for subject in range(1, 7):
        for k in range(4):
            age = 2 + subject * 3 + k * 9
            name = f"{subject:03d}A{age:02d}.JPG" if k != 3 else f"{subject:03d}a{age:02d}b.jpg"
            put(next(it), root / name)
            ages[name] = age
    return ages


def agedb(root: Path, jpegs: list[Path]) -> None:
    put(jpegs[0], root / "0_MariaCallas_35_f.jpg")
    put(jpegs[1], root / "1_MariaCallas_40_f.jpg")
    put(jpegs[2], root / "17_Jean_Reno_51_m.jpg")
    put(jpegs[3], root / "bad_name.jpg")


def appa_real(root: Path, jpegs: list[Path]) -> None:
    rows = {"train": [("000000.jpg", 36, 4.2, 39.1, 41), ("000001.jpg", 38, 20.1, 3.5, 19)],
            "valid": [("004113.jpg", 37, 60.0, 5.0, 58), ("004114.jpg", 36, "abc", 1.0, "x")]}
    it = iter(jpegs)
    for split, table in rows.items():
        with (root / f"gt_avg_{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "num_ratings", "apparent_age_avg", "apparent_age_std", "real_age"])
            w.writerows(table)
        for name, *_ in table:
            put(next(it), root / split / name)                 # the full photo
            put(next(it), root / split / f"{name}_face.jpg")   # the aligned face crop
    with (root / "allcategories_train.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "gender", "race", "makeup", "time", "happiness"])
        w.writerow(["000000.jpg", "female", "asian", "makeup", "young", "happy"])
        w.writerow(["000001.jpg", "male", "caucasian", "no_makeup", "young", "neutral"])


def matlab_datenum(d: dt.date) -> float:
    return float(d.toordinal() + 366)


def imdb_wiki(root: Path, jpegs: list[Path]) -> None:
    """imdb.mat with the real struct layout (1x1 struct of 1xN arrays, cell arrays of strings)."""
    from scipy.io import savemat

    entries = [  # path, dob, photo_taken, gender(1 male), face_score, second_face_score, celeb_id
        ("01/nm01_rm1_1950-03-02_1990.jpg", matlab_datenum(dt.date(1950, 3, 2)), 1990, 1.0, 3.2, np.nan, 11),  # 40
        ("01/nm01_rm2_1950-03-02_2001.jpg", matlab_datenum(dt.date(1950, 3, 2)), 2001, 1.0, 2.5, np.nan, 11),  # 51
        ("02/nm02_rm1_1980-09-30_2000.jpg", matlab_datenum(dt.date(1980, 9, 30)), 2000, 0.0, 4.0, np.nan, 12),  # 19
        ("02/nm02_rm2_1980-09-30_2000.jpg", matlab_datenum(dt.date(1980, 9, 30)), 2000, np.nan, 4.0, np.nan, 12),
        ("03/nm03_rm1.jpg", matlab_datenum(dt.date(1970, 1, 1)), 2000, 1.0, -np.inf, np.nan, 13),      # no face
        ("03/nm03_rm2.jpg", matlab_datenum(dt.date(1970, 1, 1)), 2000, 1.0, 3.0, 1.5, 13),             # 2 faces
        ("03/nm03_rm3.jpg", 12.0, 2000, 1.0, 3.0, np.nan, 13),                                         # bad dob
        ("04/nm04_rm1.jpg", matlab_datenum(dt.date(1990, 1, 1)), 1980, 1.0, 3.0, np.nan, 14),          # age -10
        ("04/missing.jpg", matlab_datenum(dt.date(1990, 1, 1)), 2010, 1.0, 3.0, np.nan, 14),           # no file
    ]
    n = len(entries)
    for (path, *_), src in zip(entries, jpegs):
        if "missing" not in path:
            put(src, root / path)
    cell = np.empty((1, n), dtype=object)
    for i, e in enumerate(entries):
        cell[0, i] = np.array([e[0]])
    fields = ["dob", "photo_taken", "full_path", "gender", "name", "face_score", "second_face_score", "celeb_id"]
    struct = np.empty((1, 1), dtype=[(f, object) for f in fields])
    col = lambda k: np.array([[e[k] for e in entries]], dtype=float)  # noqa: E731
    names = np.empty((1, n), dtype=object)
    for i in range(n):
        names[0, i] = np.array([f"Person {i}"])
    struct[0, 0] = (col(1), col(2), cell, col(3), names, col(4), col(5), col(6))
    savemat(root / "imdb.mat", {"imdb": struct})


def generic_csv(root: Path, jpegs: list[Path]) -> Path:
    put(jpegs[0], root / "img" / "a.jpg")
    put(jpegs[1], root / "img" / "b.jpg")
    put(jpegs[2], root / "img" / "c.jpg")
    path = root / "labels.csv"
    path.write_text("path,age,gender,subject\nimg/a.jpg,23,f,s1\nimg/b.jpg,-3,m,s2\nimg/c.jpg,41.5,,s3\n"
                    "img/missing.jpg,30,m,s4\nimg/a.jpg,30,x,s5\n")
    return path
