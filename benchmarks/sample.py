"""The bundled sample's size against the demo's accuracy.

For each (longer side, JPEG quality), ``tools/make_sample.py`` writes the
sample (the same seeded pick of TrashNet photos) to a temporary folder and
the demo's model (``PretrainedImageClassifier()`` with its defaults) is
scored by 5-fold stratified cross-validation, as ``sktransfer demo`` does.
The table is written into docs/benchmarks.md between
``<!-- sample:start -->`` and ``<!-- sample:end -->``.

Run from the project root: ``python benchmarks/sample.py [--source ../shared/datasets/trash6]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from sklearn.model_selection import StratifiedKFold, cross_val_score

from sktransfer import PretrainedImageClassifier, load_image_folder

from _common import DATASETS, ROOT, machine, write_section


sys.path.insert(0, str(ROOT / "tools"))
from make_sample import make_sample  # noqa: E402

SETTINGS = [(512, 85), (384, 75), (320, 70), (256, 60)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(DATASETS / "trash6"))
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    rows = []
    for size, quality in SETTINGS:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "sample"
            make_sample(folder, args.source, size=size, quality=quality)
            megabytes = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / 1e6
            X, y = load_image_folder(folder)
            scores = cross_val_score(PretrainedImageClassifier(random_state=0), X, y,
                                     cv=StratifiedKFold(5, shuffle=True, random_state=0))
        row = f"| {size} | {quality} | {megabytes:.2f} | {scores.mean():.3f} ± {scores.std():.3f} |"
        print(row, flush=True)
        rows.append(row)
    table = "\n".join([
        f"{len(X)} TrashNet photos (30 per class, the seeded pick of `tools/make_sample.py`); default "
        f"`PretrainedImageClassifier(random_state=0)`, 5-fold stratified cross-validation as in "
        f"`sktransfer demo`; {machine()} (only "
        "accuracy and size are compared here, no times).",
        "",
        "| longer side (px) | JPEG quality | size (MB) | accuracy (mean ± std over folds) |",
        "|---|---|---|---|",
        *rows,
        "",
        "The bundled sample uses 384 px at quality 75 (`tools/make_sample.py`'s defaults): as accurate as the "
        "larger files, at 1.9 MB; at 256 px the accuracy drops. Command: "
        "`python benchmarks/sample.py --source ../shared/datasets/trash6`.",
    ])
    print(table)
    if not args.no_write:
        write_section("sample", "## The bundled sample: size against accuracy\n\n" + table)


if __name__ == "__main__":
    main()
