"""ONNX export: one graph from decoded pixels to predictions, run by onnxruntime alone."""

import io
import json
import os
import stat
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from torch import nn

from sktransfer import (ImageEmbedder, PretrainedImageClassifier, PretrainedImageRegressor, export_onnx,
                        load_image_folder, save_model)
from sktransfer._cli import main
from sktransfer._images import load_pixels

from conftest import SAMPLE, dataset, subset

ort = pytest.importorskip("onnxruntime")  # in the dev extra; only a bare install lacks it
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "onnx_deploy.py"

# The example's decoding and inference, in a process where `import torch` fails.
WITHOUT_TORCH = """
import importlib.util, json, sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
import numpy as np
spec = importlib.util.spec_from_file_location("onnx_deploy", sys.argv[1])
deploy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deploy)
proba, meta = deploy.predict_onnx(sys.argv[2], json.loads(sys.argv[3]))
np.save(sys.argv[4], proba)
loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in ("torch", "sktransfer"))
print(json.dumps({"meta": dict(meta), "loaded": loaded}))
"""


def pixels(model, paths):
    """The graph's input: each photo resized and cropped by the estimator's own preprocessing."""
    embedder = model if isinstance(model, ImageEmbedder) else model.embedder_
    prep = embedder.backbone_.preprocessing
    return np.stack([prep.to_array(Image.open(p).convert("RGB")) for p in paths])


def run(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})[0], session.get_modelmeta().custom_metadata_map


@pytest.fixture(scope="module")
def split():
    X, y = subset(SAMPLE, 8)
    X_test, y_test = subset(SAMPLE, 3, offset=20)
    return X, y, X_test, y_test


@pytest.fixture(scope="module")
def exported(split, tmp_path_factory):
    """A calibrated classifier saved with joblib and exported by `sktransfer export`."""
    X, y, _, _ = split
    root = tmp_path_factory.mktemp("onnx")
    clf = PretrainedImageClassifier(calibration="temperature", validation_fraction=0.25, random_state=0).fit(X, y)
    assert clf.temperature_ != 1.0  # the temperature has to be in the graph
    joblib.dump(clf, root / "model.joblib")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["export", str(root / "model.joblib"), str(root / "model.onnx")]) == 0
    side = clf.embedder_.backbone_.preprocessing.crop_size
    assert f"exported to {root / 'model.onnx'}" in out.getvalue()
    assert f"uint8 images (n, {side}, {side}, 3) in, probabilities out" in out.getvalue()
    return clf, root / "model.onnx"


def test_graph_runs_without_torch_and_equals_predict_proba(exported, split, tmp_path):
    clf, path = exported
    _, _, X_test, _ = split
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, str(EXAMPLE), str(path), json.dumps(X_test), str(tmp_path / "p.npy")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []  # onnxruntime, numpy and Pillow only
    proba = np.load(tmp_path / "p.npy")
    # The example's few lines of Pillow give the estimator's pixels: the same probabilities.
    np.testing.assert_allclose(proba, clf.predict_proba(X_test), atol=1e-4)
    meta = report["meta"]
    assert json.loads(meta["classes"]) == clf.classes_.tolist()
    assert meta["task"] == "classification" and float(meta["temperature"]) == clf.temperature_
    prep = clf.embedder_.backbone_.preprocessing
    assert (meta["crop_size"], meta["resize_size"], meta["interpolation"]) == (
        str(prep.crop_size), str(prep.resize_size), prep.interpolation)


def test_batch_size_is_free(exported, split):
    clf, path = exported
    _, _, X_test, _ = split
    images = pixels(clf, X_test[:3])
    one = np.concatenate([run(path, images[i:i + 1])[0] for i in range(3)])
    np.testing.assert_allclose(run(path, images)[0], one, atol=1e-5)


def test_regressor_outputs_are_in_the_units_of_y(split, tmp_path):
    X, _, X_test, _ = split
    y = np.column_stack([np.arange(len(X)) * 10.0 + 500, np.arange(len(X)) % 3])
    reg = PretrainedImageRegressor(max_epochs=10, random_state=0).fit(X, y[:, 0])
    export_onnx(reg, tmp_path / "reg.onnx")
    pred, meta = run(tmp_path / "reg.onnx", pixels(reg, X_test))
    assert pred.shape == (len(X_test),) and meta["task"] == "regression"
    np.testing.assert_allclose(pred, reg.predict(X_test), rtol=1e-5, atol=1e-3)  # values near 500


def test_embedder_and_fine_tuned_multilabel_models(split, tmp_path):
    X, y, X_test, _ = split
    embedder = ImageEmbedder().fit()
    export_onnx(embedder, tmp_path / "emb.onnx")
    features, meta = run(tmp_path / "emb.onnx", pixels(embedder, X_test))
    assert meta["task"] == "features" and "classes" not in meta
    np.testing.assert_allclose(features, embedder.transform(X_test), atol=1e-4)

    Y = np.column_stack([np.isin(y, ["glass", "plastic"]), np.isin(y, ["cardboard", "paper"])]).astype(int)
    tuned = PretrainedImageClassifier(unfreeze=1, max_epochs=3, random_state=0).fit(X, Y)
    export_onnx(tuned, tmp_path / "tuned.onnx")
    proba, meta = run(tmp_path / "tuned.onnx", pixels(tuned, X_test))
    assert meta["task"] == "multilabel" and json.loads(meta["classes"]) == [0, 1]
    np.testing.assert_allclose(proba, tuned.predict_proba(X_test), atol=1e-4)


@pytest.mark.parametrize("recipe", [
    dict(resize_size=(256, 224), crop_size=(224, 192)),  # a non-square input
    dict(resize_size=160, crop_size=160, crop_mode="squash"),
], ids=["non-square", "squash"])
def test_any_recipe_exports_and_its_metadata_says_how_to_prepare_the_pixels(split, tmp_path, recipe):
    _, _, X_test, _ = split
    prep = dict(interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3, **recipe)
    embedder = ImageEmbedder(preprocessing=prep, engine="torch").fit()
    export_onnx(embedder, tmp_path / "emb.onnx")
    features, meta = run(tmp_path / "emb.onnx", pixels(embedder, X_test))
    np.testing.assert_allclose(features, embedder.transform(X_test), atol=1e-4)
    shape = embedder.backbone_.preprocessing
    assert meta["crop_mode"] == recipe.get("crop_mode", "center")
    assert json.loads(meta["crop_size"]) in (list(shape.crop_shape), shape.crop_size)
    h, w = shape.crop_shape
    assert f"uint8 (n, {h}, {w}, 3)" in meta["input"]


def test_what_cannot_be_exported_is_refused_with_the_reason(exported, split, tmp_path, capsys):
    clf, _ = exported
    X, y, _, _ = split
    target = tmp_path / "x.onnx"
    flipped = PretrainedImageClassifier(tta="flip", max_epochs=2, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match=r"tta='flip' cannot be exported.*set_params\(tta=None\)"):
        export_onnx(flipped, target)
    with pytest.raises(TypeError, match="got Pipeline"):
        export_onnx(make_pipeline(ImageEmbedder(), LogisticRegression()), target)
    with pytest.raises(NotFittedError):
        export_onnx(PretrainedImageClassifier(), target)
    assert not target.exists() and not list(tmp_path.iterdir())  # nothing half-written
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match=r"export_onnx: .*folder' is a folder; give the \.onnx file"):
        export_onnx(clf, tmp_path / "folder")  # told before the export, not after it of a temporary file
    assert export_onnx(clf, tmp_path / "new" / "sub" / "m.onnx").is_file()  # folders made, as save_model makes them
    joblib.dump(clf, tmp_path / "m.joblib")
    assert main(["export", str(tmp_path / "m.joblib"), str(tmp_path / "m.txt")]) == 1
    assert "must end in .onnx" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "none.joblib"), str(target)]) == 1
    assert "none.joblib' does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_the_file_reaches_the_disk_with_the_mode_of_saved_models(tmp_path, synced, umask):
    # A file the user keeps, as save_model's: the mode the umask leaves (0644 under 022), and
    # its bytes synced before the rename publishes it, the folder after.
    torch.manual_seed(0)
    embedder = ImageEmbedder(nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU()), engine="torch", preprocessing=dict(
        resize_size=40, crop_size=32, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)).fit()
    previous = os.umask(umask)
    try:
        path = export_onnx(embedder, tmp_path / "features.onnx")
        saved = [p for p in Path(save_model(embedder, tmp_path / "saved")).iterdir()]
    finally:
        os.umask(previous)
    assert {stat.S_IMODE(p.stat().st_mode) for p in [path, *saved]} == {0o666 & ~umask}
    assert ("file", path.stat().st_ino) in synced and ("folder", tmp_path.stat().st_ino) in synced
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["features.onnx"]  # no temporary file left


def test_sample_photos_load_for_the_graph(split, tmp_path):
    """The example's decoding recipe gives exactly the estimator's pixels."""
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import onnx_deploy
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    _, _, X_test, _ = split
    embedder = ImageEmbedder().fit()
    prep = embedder.backbone_.preprocessing
    meta = {"resize_size": str(prep.resize_size), "crop_size": str(prep.crop_size), "interpolation": prep.interpolation}
    Image.open(X_test[0]).rotate(90, expand=True).save(tmp_path / "landscape.png")  # the other orientation
    photos = X_test + [str(tmp_path / "landscape.png")]
    np.testing.assert_array_equal(onnx_deploy.load_pixels(photos, meta), pixels(embedder, photos))
    # Files sktransfer decodes its own way, against its own decoding: a phone-size JPEG
    # (decoded at a reduced scale), 16- and 32-bit greyscale (scaled to 8 bits, not saturated),
    # an EXIF orientation, transparency (laid onto white).
    with Image.open(load_image_folder(dataset("trash6"))[0][0]) as photo:
        photo = photo.convert("RGB")
    photo.resize((3024, 4032), Image.Resampling.BICUBIC).save(tmp_path / "phone.jpg", quality=90)
    grey = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey[:, ::-1].copy()).save(tmp_path / "grey16.png")
    Image.fromarray(grey.astype(np.int32)).save(tmp_path / "grey32.tif")
    Image.fromarray((grey / 65535.0).astype(np.float32)).save(tmp_path / "float.tif")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    photo.save(tmp_path / "rotated.jpg", exif=exif)
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rgba.save(tmp_path / "transparent.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png", transparency=0)
    odd = [str(tmp_path / name) for name in
           ("phone.jpg", "grey16.png", "grey32.tif", "float.tif", "rotated.jpg", "transparent.png", "palette.png")]
    np.testing.assert_array_equal(onnx_deploy.load_pixels(odd, meta), np.stack([load_pixels(p, prep) for p in odd]))
    with pytest.raises(ValueError, match="square centre crop; this model wants crop_mode 'squash'"):
        onnx_deploy.load_pixels(photos, {**meta, "crop_mode": "squash"})
