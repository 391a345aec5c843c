"""Unusual but decodable files: each is written here with Pillow and must become
the RGB image a viewer shows, in the 3-channel shape the backbone accepts."""

import numpy as np
import pytest
from PIL import Image

from sktransfer import ImageEmbedder, Preprocessing
from sktransfer._images import open_image

PREP = Preprocessing(256, 224, "bicubic", (0.5,) * 3, (0.5,) * 3)


def _gradient(w=60, h=40):
    """A smooth RGB picture (lossy formats keep it within a few grey levels)."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def _close(a, b, tol):
    return np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).mean() <= tol


def _write(tmp_path, kind):
    """Write one file of ``kind``; return (path, expected RGB picture or None, tolerance)."""
    base = _gradient()
    path = tmp_path / kind
    if kind == "gray.png":
        base.convert("L").save(path)
        return path, base.convert("L").convert("RGB"), 0
    if kind == "gray-alpha.png":  # LA: the left half fully transparent
        la = base.convert("LA")
        la.putalpha(Image.fromarray(np.where(np.arange(60) < 30, 0, 255)[None].repeat(40, 0).astype(np.uint8)))
        la.save(path)
        expected = np.asarray(base.convert("L").convert("RGB")).copy()
        expected[:, :30] = 255  # transparent shows as white
        return path, expected, 0
    if kind == "palette-transparent.png":
        pal = base.quantize(16)
        pal.save(path, transparency=int(np.asarray(pal)[0, 0]))
        return path, None, 0
    if kind == "rgba.png":
        rgba = base.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(path)
        blend = (np.asarray(base, dtype=float) * 128 + 255 * 127) / 255
        return path, blend, 1
    if kind == "cmyk.jpg":
        base.convert("CMYK").save(path, quality=95)
        return path, base, 6
    if kind == "16bit.png":
        ramp = (np.linspace(0, 65535, 60)[None, :].repeat(40, 0)).astype(np.uint16)
        Image.fromarray(ramp).save(path)
        assert Image.open(path).mode.startswith("I")
        expected = (ramp / 65535 * 255).astype(np.uint8)
        return path, np.stack([expected] * 3, -1), 1
    if kind == "exif-rotated.jpg":
        exif = base.getexif()
        exif[0x0112] = 6  # "rotate 90 CW to view"
        base.save(path, exif=exif, quality=95)
        return path, base.transpose(Image.Transpose.ROTATE_270), 3
    if kind == "animated.gif":
        frames = [Image.new("RGB", (60, 40), c) for c in ("red", "blue", "green")]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
        assert Image.open(path).n_frames == 3
        return path, frames[0], 0
    if kind == "progressive.jpg":
        base.save(path, progressive=True, quality=95)
        return path, base, 3
    if kind == "lossless.webp":
        base.save(path, lossless=True)
        return path, base, 0
    if kind == "plain.bmp":
        base.save(path)
        return path, base, 0
    if kind == "plain.tiff":
        base.save(path)
        return path, base, 0
    if kind == "one-pixel.png":
        Image.new("RGB", (1, 1), (10, 200, 30)).save(path)
        return path, np.array([[[10, 200, 30]]]), 0
    if kind == "panorama.jpg":
        Image.new("RGB", (20000, 50), (200, 100, 50)).save(path)
        return path, np.full((50, 20000, 3), (200, 100, 50)), 2
    raise AssertionError(kind)


KINDS = ["gray.png", "gray-alpha.png", "palette-transparent.png", "rgba.png", "cmyk.jpg", "16bit.png",
         "exif-rotated.jpg", "animated.gif", "progressive.jpg", "lossless.webp", "plain.bmp",
         "plain.tiff", "one-pixel.png", "panorama.jpg"]


@pytest.mark.parametrize("kind", KINDS)
def test_unusual_file_decodes_to_the_picture_a_viewer_shows(tmp_path, kind):
    path, expected, tol = _write(tmp_path, kind)
    image = open_image(str(path))
    assert image.mode == "RGB"
    if expected is not None:
        assert _close(image, expected, tol), kind
    array = PREP.to_array(open_image(path.read_bytes(), min_size=PREP.resize_size))
    assert array.shape == (224, 224, 3) and array.dtype == np.uint8


def test_wide_integer_and_float_pixels_scale_by_their_mode_not_by_the_pictures_content(tmp_path):
    """Two 32-bit integer TIFFs alike but for one pixel decode alike elsewhere; integers are
    16-bit values (as 16-bit photos are stored in 32-bit containers), floats lie in [0, 1]."""
    a = np.full((8, 8), 200, np.int32)
    a[0, 0] = 250
    b = a.copy()
    b[0, 0] = 300  # the only difference: its brightest pixel is above 255
    for name, array in (("a.tif", a), ("b.tif", b)):
        Image.fromarray(array, "I").save(tmp_path / name)
        assert Image.open(tmp_path / name).mode == "I"
    decoded = [np.asarray(open_image(str(tmp_path / n))) for n in ("a.tif", "b.tif")]
    np.testing.assert_array_equal(decoded[0][1:], decoded[1][1:])
    assert decoded[0][5, 5, 0] == round(200 / 65535 * 255)
    Image.fromarray(np.full((8, 8), 0.8, np.float32), "F").save(tmp_path / "f.tif")
    assert np.asarray(open_image(str(tmp_path / "f.tif")))[4, 4, 0] == round(0.8 * 255)


def test_transparent_palette_entries_become_white(tmp_path):
    path, _, _ = _write(tmp_path, "palette-transparent.png")
    source = Image.open(path)
    transparent = np.asarray(source) == source.info["transparency"]
    out = np.asarray(open_image(str(path)))
    assert transparent.any() and (out[transparent] == 255).all()
    opaque = np.asarray(source.convert("RGB"))[~transparent]
    np.testing.assert_array_equal(out[~transparent], opaque)


@pytest.mark.parametrize("mode", ["P", "RGB", "L"])
def test_a_transparent_colour_becomes_white_in_every_mode_that_has_one(tmp_path, mode):
    # PNG's tRNS names one transparent colour in RGB and greyscale files too, not only palettes:
    # the same picture decodes alike whichever mode it was saved in.
    picture = np.array(_gradient().convert("L" if mode == "L" else "RGB"))
    picture[:20] = 7 if mode == "L" else (10, 20, 30)  # the top half is the transparent colour
    image = Image.fromarray(picture)
    colour = 7 if mode == "L" else (10, 20, 30)
    if mode == "P":
        image = image.quantize(64)
        colour = int(np.asarray(image)[0, 0])
    image.save(tmp_path / "t.png", transparency=colour)
    out = np.asarray(open_image(str(tmp_path / "t.png")))
    assert (out[:20] == 255).all()
    assert (out[20:] != 255).any()


def test_panorama_crop_is_its_centre_at_the_backbone_resolution():
    # The centre of a long strip keeps its content after the memory-saving resize.
    strip = np.zeros((50, 20000, 3), np.uint8)
    strip[:, 10000:] = 255
    out = PREP.to_array(Image.fromarray(strip))
    assert out.shape == (224, 224, 3)
    assert out[:, :100].mean() < 5 and out[:, 124:].mean() > 250  # the edge sits in the middle


@pytest.mark.parametrize("size", [(700, 90), (90, 700), (20000, 50)])
def test_a_panoramas_centre_band_is_the_pixels_of_the_whole_resize_and_crop(size):
    # Resampling only the band the crop keeps must cut it where the crop of the whole resized
    # image starts (a whole pixel, as torchvision and timm round it), not half a pixel off.
    from conftest import SAMPLE

    from sktransfer._images import _RESAMPLE, _crop_or_pad

    photo = Image.open(next(SAMPLE.glob("glass/*.jpg"))).convert("RGB").resize(size)
    prep = Preprocessing.from_timm(dict(input_size=(3, 224, 288), crop_pct=0.9, interpolation="bilinear",
                                        mean=(0.5,) * 3, std=(0.5,) * 3))
    ch, cw = prep.crop_shape
    whole = _crop_or_pad(photo.resize(prep._resized(*photo.size), _RESAMPLE["bilinear"]), ch, cw, (0, 0, 0))
    band = prep.to_array(photo)
    assert max(prep._resized(*photo.size)) > 4 * max(ch, cw, prep.decode_size)  # the band's path
    assert np.abs(band.astype(int) - np.asarray(whole, dtype=int)).max() <= 1  # float32 box edges


def test_every_unusual_file_goes_through_the_backbone(tmp_path):
    paths = [str(_write(tmp_path, kind)[0]) for kind in KINDS]
    features = ImageEmbedder().fit_transform(paths)
    assert features.shape == (len(KINDS), 1280) and np.isfinite(features).all()
