"""Deploy without PyTorch: export a classifier to ONNX, then predict with onnxruntime.

    python examples/onnx_deploy.py [DATA_DIR] [--per-class N] [-o model.onnx]

Trains a PretrainedImageClassifier on part of DATA_DIR (one sub-folder per
class; default: the photo sample bundled with sktransfer), exports it with
``export_onnx``, predicts the held-out photos with onnxruntime and compares
with the estimator. ``load_pixels`` and ``predict_onnx`` use only Pillow,
numpy and onnxruntime: copy them (and ``decode``) to the machine that serves the model.
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

SAMPLE = Path(__file__).resolve().parents[1] / "sktransfer" / "data" / "trash_sample"


def decode(path, shorter):
    """An image file as RGB, decoded as sktransfer decodes it for a resize to ``shorter`` pixels.

    A JPEG more than twice as large as needed is decoded at a reduced scale
    (Pillow's draft mode), the EXIF orientation is applied, 16- and 32-bit
    greyscale is scaled to 8 bits (not saturated) and transparent pixels are
    laid onto white.
    """
    image = Image.open(path)
    w, h = image.size
    if image.format == "JPEG" and min(w, h) > 2 * shorter:
        scale = shorter / min(w, h)
        image.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        top = 1.0 if image.mode == "F" else 65535.0  # integers as 16-bit values, floats as 0-1
        grey = np.nan_to_num(np.asarray(image).astype(np.float64)) / top * 255.0
        image = Image.fromarray(np.rint(np.clip(grey, 0, 255)).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


def load_pixels(paths, meta):
    """Decode each image, resize its shorter side and cut out the centre, as the model's metadata says."""
    resize, crop = json.loads(meta["resize_size"]), json.loads(meta["crop_size"])
    if meta.get("crop_mode", "center") != "center" or not (isinstance(resize, int) and isinstance(crop, int)):
        raise ValueError(f"these lines cut a square centre crop; this model wants crop_mode "
                         f"{meta['crop_mode']!r}, resize_size {resize}, crop_size {crop}.")
    resample = Image.Resampling[meta["interpolation"].upper()]
    batch = []
    for path in paths:
        image = decode(path, resize)
        w, h = image.size
        size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        image = image.resize(size, resample)
        left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
        batch.append(np.asarray(image.crop((left, top, left + crop, top + crop))))
    return np.stack(batch)  # uint8, (n, crop, crop, 3)


def predict_onnx(model_path, paths):
    """Class probabilities of image files from an exported model, and its metadata."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    (proba,) = session.run(None, {"images": load_pixels(paths, meta)})
    return proba, meta


def main():
    from sklearn.model_selection import train_test_split

    from sktransfer import PretrainedImageClassifier, export_onnx, load_image_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=SAMPLE, help="folder with one sub-folder per class")
    parser.add_argument("--per-class", type=int, default=20, help="photos of each class used (default: 20)")
    parser.add_argument("-o", "--output", default="model.onnx", help="the ONNX file (default: model.onnx)")
    args = parser.parse_args()
    paths, labels = load_image_folder(args.data)
    keep = np.concatenate([np.flatnonzero(labels == c)[:args.per_class] for c in np.unique(labels)])
    X_train, X_test, y_train, y_test = train_test_split(
        [paths[i] for i in keep], labels[keep], test_size=0.25, stratify=labels[keep], random_state=0)

    clf = PretrainedImageClassifier(random_state=0).fit(X_train, y_train)
    export_onnx(clf, args.output)
    print(f"{len(X_train)} training photos; exported to {args.output} "
          f"({Path(args.output).stat().st_size / 1e6:.1f} MB)")

    proba, meta = predict_onnx(args.output, X_test)
    classes = np.array(json.loads(meta["classes"]))
    expected = clf.predict_proba(X_test)
    print(f"onnxruntime on {len(X_test)} held-out photos: accuracy {np.mean(classes[proba.argmax(1)] == y_test):.3f}, "
          f"same predictions as the estimator: {np.array_equal(proba.argmax(1), expected.argmax(1))}, "
          f"largest probability difference {np.abs(proba - expected).max():.1e}")
    for path, row in list(zip(X_test, proba))[:3]:
        print(f"  {Path(path).parent.name}/{Path(path).name} -> {classes[row.argmax()]} ({row.max():.2f})")


if __name__ == "__main__":
    main()
