"""Rebuild data/sample/utkface/ from ../shared/data (how the shipped demo sample was made).

Deterministic: within each 10-year age bin the shared files are ordered by sha1(filename) and
every 6th is taken, so the ~1,000 images keep the shared set's spread over all ages.
Usage: python scripts/make_demo_sample.py [SHARED_DATA_DIR]
"""

import csv
import hashlib
import shutil
import sys
from collections import defaultdict
from pathlib import Path

shared = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
dest = Path(__file__).resolve().parent.parent / "data" / "sample" / "utkface"
by_bin = defaultdict(list)
with (shared / "utkface_manifest.csv").open() as f:
    for row in csv.DictReader(f):
        by_bin[min(int(row["age"]) // 10, 10)].append(row["filename"])
picked = []
for b in sorted(by_bin):
    names = sorted(by_bin[b], key=lambda n: hashlib.sha1(n.encode()).hexdigest())
    picked += names[::6]
dest.mkdir(parents=True, exist_ok=True)
for name in picked:
    shutil.copyfile(shared / "utkface" / name, dest / name)
print(f"{len(picked)} images → {dest}")
