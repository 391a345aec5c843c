"""Regenerate the bundled photo sample ``sktransfer/data/trash_sample`` from TrashNet.

A seeded pick of ``--per-class`` camera photos of each class of
``../shared/datasets/trash6`` (TrashNet, 384×512), downscaled so that the
longer side is ``--size`` pixels and saved as baseline JPEG at ``--quality``,
with no metadata. The same arguments give the same files, byte for byte.

    python tools/make_sample.py                    # the bundled sample
    python tools/make_sample.py --size 320 --quality 70 -o /tmp/other

``benchmarks/sample.py`` measures the demo's accuracy at several sizes and
qualities; the defaults here are the choice it supports.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "datasets" / "trash6"
TARGET = ROOT / "sktransfer" / "data" / "trash_sample"

ATTRIBUTION = """\
# Trash sample

{n} photos ({per_class} per class: {classes}), a seeded pick from TrashNet
by Gary Thung and Mindy Yang (github.com/garythung/trashnet, `dataset-resized`):
one object on a plain background, photographed with a phone camera. Downscaled
to {size} pixels on the longer side and recompressed as JPEG quality {quality}
by `tools/make_sample.py`.

Licence: MIT. Copyright (c) 2017 Gary Thung.

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def make_sample(target, source=SOURCE, per_class=30, size=384, quality=75, seed=0):
    """Write the sample to ``target`` (replaced as a whole); return the number of photos."""
    source, target = Path(source), Path(target)
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{str(source)!r} has no class folders; expected TrashNet's six (cardboard ... trash).")
    rng = np.random.default_rng(seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".sample-", dir=target.parent))
    try:
        for c in classes:
            photos = sorted(p for p in (source / c).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
            if len(photos) < per_class:
                raise ValueError(f"{str(source / c)!r} has {len(photos)} photos; per_class={per_class} needs more.")
            (build / c).mkdir()
            for i in sorted(rng.choice(len(photos), per_class, replace=False)):
                image = Image.open(photos[i]).convert("RGB")
                scale = size / max(image.size)
                if scale < 1:
                    image = image.resize((round(image.width * scale), round(image.height * scale)),
                                         Image.Resampling.LANCZOS)
                image.save(build / c / f"{photos[i].stem}.jpg", quality=quality, optimize=True)
        (build / "ATTRIBUTION.md").write_text(ATTRIBUTION.format(
            n=per_class * len(classes), per_class=per_class, classes=", ".join(classes), size=size,
            quality=quality))
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=".old-", dir=target.parent))
            os.replace(target, old / "sample")
            os.replace(build, target)
            shutil.rmtree(old)
        else:
            os.replace(build, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return per_class * len(classes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(SOURCE), help="TrashNet folder, one sub-folder per class")
    parser.add_argument("-o", "--output", default=str(TARGET))
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--size", type=int, default=384, help="longer side in pixels")
    parser.add_argument("--quality", type=int, default=75, help="JPEG quality (1-95)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n = make_sample(args.output, args.source, args.per_class, args.size, args.quality, args.seed)
    total = sum(p.stat().st_size for p in Path(args.output).rglob("*") if p.is_file())
    print(f"wrote {n} photos to {args.output} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
