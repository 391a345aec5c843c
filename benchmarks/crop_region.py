"""Resampling only the region the centre crop keeps, against resize-then-crop.

Pillow's ``Image.resize(size, box=...)`` resamples a region of the source;
for the region a centre crop keeps, the filter centres and the scale are
those of the whole resize, so only the kept pixels are computed. This script
measures what that saves (ms per photo, one thread, interleaved rounds) and
how far its pixels are from resize-then-crop, the pixels of the weights'
recipe (timm's and torchvision's transforms), over several photo shapes,
every interpolation and several recipes.

    python benchmarks/crop_region.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import DATASETS, machine

SHAPES = [None, (500, 375), (375, 500), (1600, 1200), (400, 300), (300, 400), (400, 120), (90, 300),
          (150, 100), (257, 256), (256, 300), (1000, 999), (640, 480), (224, 224), (231, 900)]
RECIPES = [dict(resize_size=256, crop_size=224), dict(resize_size=232, crop_size=224),
           dict(resize_size=(284, 195), crop_size=(256, 176)), dict(resize_size=292, crop_size=256),
           dict(resize_size=248, crop_size=224)]


def resize_then_crop(prep, image):
    from sktransfer._images import _RESAMPLE, _crop_or_pad

    size = prep._resized(*image.size)
    ch, cw = prep.crop_shape
    resized = image.resize(size, _RESAMPLE[prep.interpolation]) if size != image.size else image
    return np.asarray(_crop_or_pad(resized, ch, cw, (0, 0, 0)))


def crop_region(prep, image):
    """Resample only the kept region: one ``resize(box=...)`` call."""
    from sktransfer._images import _RESAMPLE, _crop_or_pad

    w, h = image.size
    sw, sh = prep._resized(w, h)
    ch, cw = prep.crop_shape
    if (sw, sh) == (w, h):
        return np.asarray(_crop_or_pad(image, ch, cw, (0, 0, 0)))
    spans, out = [], []
    for length, resized, crop in ((w, sw, cw), (h, sh, ch)):
        if crop >= resized:  # the crop pads this side: keep all of it
            spans.append((0, length))
            out.append(resized)
        else:
            start = int(round((resized - crop) / 2.0))
            spans.append((start * length / resized, (start + crop) * length / resized))
            out.append(crop)
    box = (spans[0][0], spans[1][0], spans[0][1], spans[1][1])
    region = image.resize(tuple(out), _RESAMPLE[prep.interpolation], box=box)
    return np.asarray(_crop_or_pad(region, ch, cw, (0, 0, 0)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from PIL import Image

    from sktransfer import Preprocessing
    from sktransfer._images import _RESAMPLE, open_image

    print(machine())
    trash = sorted((DATASETS / "trash6").glob("*/*.jpg"))
    flowers = sorted((DATASETS / "flowers5").glob("*/*.jpg"))
    default = Preprocessing(256, 224, "bicubic", (0.5,) * 3, (0.5,) * 3)  # EfficientNet-Lite0's recipe
    timed = [open_image(str(p), min_size=default.decode_size) for p in trash[::20][:60]]
    times = {"resize then crop": [], "crop region": []}
    for r in range(args.rounds):
        for label, fn in (("resize then crop", resize_then_crop), ("crop region", crop_region)):
            start = time.perf_counter()
            for image in timed:
                fn(default, image)
            times[label].append((time.perf_counter() - start) / len(timed) * 1000)
    print(f"{len(timed)} trash6 photos, bicubic 256/224, ms per photo (median of {args.rounds} rounds): "
          + ", ".join(f"{k} {np.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for k, v in times.items()))

    photos = [Image.open(p).convert("RGB") for p in trash[::50][:6] + flowers[::400][:6]]
    for interpolation in _RESAMPLE:
        worst_fraction, worst_level, cases, over = 0.0, 0, 0, 0
        for recipe in RECIPES:
            prep = Preprocessing(**recipe, interpolation=interpolation, mean=(0.5,) * 3, std=(0.5,) * 3)
            for photo in photos:
                for shape in SHAPES:
                    image = photo if shape is None else photo.resize(shape)
                    diff = np.abs(resize_then_crop(prep, image).astype(int) - crop_region(prep, image))
                    fraction = float((diff > 0).mean())
                    worst_fraction, worst_level = max(worst_fraction, fraction), max(worst_level, int(diff.max()))
                    cases += 1
                    over += fraction > 1e-3 or diff.max() > 1
        print(f"{interpolation}: {cases} cases, differing pixels at most {worst_fraction:.2%}, "
              f"by at most {worst_level} grey levels; {over} cases beyond 1 level on 0.1% of pixels")


if __name__ == "__main__":
    main()
