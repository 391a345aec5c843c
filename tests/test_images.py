import gc
import warnings

import numpy as np
import pytest
import torch
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


def _photos(sample):
    """Real photos of several shapes: bundled flowers, and trash6 where present."""
    from conftest import DATASETS, subset

    paths = [sample[0][i] for i in (0, 37, 75, 149)]
    if (DATASETS / "trash6").is_dir():
        paths += subset(DATASETS / "trash6", 1)[0][:3]
    images = [Image.open(p).convert("RGB") for p in paths]
    # A wide and a tall one, and one smaller than the crop (padding).
    return images + [images[0].resize((400, 120)), images[1].resize((90, 300)), images[2].resize((150, 100))]


def _assert_same_pixels(prep, transform, images):
    for image in images:
        ours = prep.normalize([prep.to_array(image)])[0]
        theirs = transform(image)
        assert ours.shape == theirs.shape, image.size
        assert torch.allclose(ours, theirs, atol=1e-6), image.size


TIMM_RECIPES = {
    "center": {},
    "squash": dict(crop_mode="squash", crop_pct=1.0),
    "squash, non-square": dict(crop_mode="squash", crop_pct=0.9, input_size=(3, 192, 256)),
    "border": dict(crop_mode="border", crop_pct=0.95, interpolation="bilinear"),
    "center, non-square": dict(input_size=(3, 256, 176), crop_pct=0.9),
}


@pytest.mark.parametrize("overlay", TIMM_RECIPES.values(), ids=TIMM_RECIPES.keys())
def test_pixels_equal_timms_own_transform(sample, overlay):
    import timm
    from timm.data import create_transform, resolve_model_data_config

    from sktransfer._backbones import _timm_recipe

    # timm's configs are overlaid on a small network: no weights are downloaded.
    net = timm.create_model("resnet10t", pretrained=False, pretrained_cfg_overlay=overlay)
    prep = _timm_recipe(net)
    assert prep.crop_mode == overlay.get("crop_mode", "center")
    _assert_same_pixels(prep, create_transform(**resolve_model_data_config(net)), _photos(sample))


def test_user_timm_module_brings_its_recipe(sample):
    import timm
    from timm.data import create_transform, resolve_model_data_config

    net = timm.create_model("resnet10t", pretrained=False, num_classes=0,
                            pretrained_cfg_overlay=TIMM_RECIPES["squash, non-square"])
    b = build_backbone(net)
    assert b.preprocessing.crop_shape == (192, 256) and b.preprocessing.crop_mode == "squash"
    _assert_same_pixels(b.preprocessing, create_transform(**resolve_model_data_config(net)), _photos(sample))
    with torch.inference_mode():  # the probe and the features follow the non-square input
        assert b.module(b.preprocessing.normalize([b.preprocessing.to_array(_photos(sample)[0])])).shape == (1, 512)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "timm/resnet10t"])
def test_registry_timm_recipes_equal_timms_transform(sample, name):
    import timm
    from timm.data import create_transform, resolve_model_data_config

    from sktransfer._backbones import _OFFLINE

    arch = _OFFLINE[name][0] if name in _OFFLINE else name[len("timm/"):]
    prep = build_backbone(name, weights="DEFAULT" if name in _OFFLINE else None).preprocessing
    transform = create_transform(**resolve_model_data_config(timm.create_model(arch, pretrained=False)))
    _assert_same_pixels(prep, transform, _photos(sample))


def test_pixels_equal_torchvision_weights_transforms(sample):
    from torchvision.models import get_model_weights

    prep = build_backbone("resnet18", weights=None).preprocessing
    _assert_same_pixels(prep, get_model_weights("resnet18").DEFAULT.transforms(), _photos(sample))
    for name in ("convnext_tiny", "vit_b_16", "efficientnet_b3"):  # other sizes and interpolations
        transform = get_model_weights(name).DEFAULT.transforms()
        _assert_same_pixels(Preprocessing.from_torchvision(transform), transform, _photos(sample))


def test_recipe_from_before_crop_mode_loads_as_center():
    import pickle

    prep = Preprocessing(256, 224, "bicubic", (0.5,) * 3, (0.5,) * 3)
    state = {k: v for k, v in vars(prep).items() if k != "crop_mode"}
    old = Preprocessing.__new__(Preprocessing)
    object.__getattribute__(old, "__dict__").update(state)  # as an older pickle restores it
    assert pickle.loads(pickle.dumps(old)) == prep and old.crop_mode == "center"
    assert repr(prep) == repr(old)  # so feature fingerprints stay as they were


@pytest.mark.parametrize("bad, message", [
    (dict(crop_mode="fit"), "crop_mode='fit' is not supported"),
    (dict(crop_size=(224, 224, 3)), "crop_size=.* is not valid"),
    (dict(resize_size=0), "resize_size=0 is not valid"),
    (dict(mean=(0.5,)), r"mean=\(0.5,\) is not valid; expected 3 finite numbers"),
    (dict(std=(0.5, 0.0, 0.5)), "std=.* each above 0"),
    (dict(std="wide"), "std='wide' is not valid"),
])
def test_invalid_recipe_names_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        Preprocessing(**dict(dict(resize_size=256, crop_size=224, interpolation="bicubic",
                                  mean=(0.5,) * 3, std=(0.5,) * 3), **bad))


def test_decode_time_downscale_stays_close(tmp_path, sample):
    big = tmp_path / "big.jpg"
    Image.open(sample[0][5]).convert("RGB").resize((1600, 1200)).save(big, quality=95)
    prep = build_backbone("efficientnet_lite0").preprocessing
    full = prep.to_array(open_image(str(big)))
    fast = prep.to_array(open_image(str(big), min_size=prep.decode_size))
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


@pytest.mark.parametrize("name", ["anim.gif", "pages.tif"])
def test_open_image_closes_a_multi_frame_file(tmp_path, name):
    # Pillow keeps a GIF's or TIFF's file open after decoding one frame, for seeking to the others.
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (10, 200)]
    path = tmp_path / name
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        image = open_image(str(path))
        pixels = np.asarray(image)
        del image
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert pixels.shape == (16, 16, 3) and (pixels == 10).all()  # the first frame, still readable
