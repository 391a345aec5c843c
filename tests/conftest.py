"""Shared fixtures: real photos from ../shared/datasets (or the bundled sample)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

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
