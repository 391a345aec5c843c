import numpy as np
import pytest
from PIL import Image

from sktransfer import Preprocessing
from sktransfer._backbones import build_backbone
from sktransfer._images import open_image

from conftest import reference_pixels


def test_default_recipe_comes_from_the_weights():
    prep = build_backbone("efficientnet_lite0").preprocessing
    assert prep == Preprocessing(256, 224, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    prep = build_backbone("resnet18", weights=None).preprocessing
    assert prep.mean == pytest.approx((0.485, 0.456, 0.406)) and prep.interpolation == "bilinear"


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (1600, 1200), (128, 128)])
def test_pixels_match_torchvision_pipeline(sample, size):
    prep = build_backbone("resnet18", weights=None).preprocessing
    image = Image.open(sample[0][5]).convert("RGB").resize(size)
    ours = prep.normalize([prep.to_array(image)])[0]
    ref = reference_pixels(prep, image)
    assert ours.shape == ref.shape == (3, 224, 224)
    # PIL and torch resize kernels differ by rounding: a couple of grey levels at most.
    assert (ours - ref).abs().mean() < 0.02


def test_decode_time_downscale_stays_close(tmp_path, sample):
    big = tmp_path / "big.jpg"
    Image.open(sample[0][5]).convert("RGB").resize((1600, 1200)).save(big, quality=95)
    prep = build_backbone("efficientnet_lite0").preprocessing
    full = prep.to_array(open_image(str(big)))
    fast = prep.to_array(open_image(str(big), min_size=prep.resize_size))
    assert np.abs(full.astype(int) - fast.astype(int)).mean() < 3


def test_open_image_accepts_every_item_type(sample):
    path = sample[0][0]
    with open(path, "rb") as f:
        data = f.read()
    im = Image.open(path)
    arr = np.asarray(im.convert("RGB"))
    for item in (path, data, im, arr, arr[:, :, 0], arr[:, :, :1]):
        out = open_image(item)
        assert out.mode == "RGB" and out.size == im.size
