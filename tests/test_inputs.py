from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sktransfer import ImageInputError, load_image_folder
from sktransfer._inputs import as_image_list, read_item


def test_load_image_folder_is_sorted_with_class_labels(sample):
    paths, labels = sample
    assert len(paths) == 180 and len(labels) == 180
    assert list(labels) == sorted(labels)
    assert sorted(set(labels)) == ["cardboard", "glass", "metal", "paper", "plastic", "trash"]
    for p, label in zip(paths, labels):
        assert Path(p).parent.name == label
    assert (paths, list(labels)) == (load_image_folder(Path(paths[0]).parents[1])[0], list(labels))


def test_load_image_folder_skips_non_images_and_names_bad_root(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.PNG")
    (tmp_path / "a" / "notes.txt").write_text("hello")
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"")
    paths, labels = load_image_folder(tmp_path)
    assert [Path(p).name for p in paths] == ["x.PNG"] and list(labels) == ["a"]
    with pytest.raises(ValueError, match="not a folder"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found no images"):
        load_image_folder(tmp_path / "empty")


def test_containers_of_paths_are_accepted(sample):
    paths = sample[0][:3]
    expected = [str(p) for p in paths]
    for X in (paths, np.array(paths), pd.Series(paths), pd.DataFrame({"p": paths}),
              np.array(paths, dtype=object).reshape(-1, 1), [Path(p) for p in paths], tuple(paths)):
        assert [str(p) for p in as_image_list(X)] == expected


def test_arrays_pil_images_and_bytes_are_accepted(sample):
    im = Image.open(sample[0][0])
    arr = np.asarray(im.convert("RGB"))
    data = Path(sample[0][0]).read_bytes()
    assert len(as_image_list([im, arr, data, sample[0][0]])) == 4
    assert len(as_image_list(np.stack([arr, arr]))) == 2


@pytest.mark.parametrize("X, match", [
    (None, "None"),
    ([], "empty"),
    ("photo.jpg", "single str"),
    (np.zeros((3, 4)), "ndarray of shape"),
    (pd.DataFrame({"a": [1], "b": [2]}), "2 columns"),
    (42, "sequence of images"),
])
def test_bad_containers_name_X_and_what_is_accepted(X, match):
    with pytest.raises((ValueError, TypeError), match=match):
        as_image_list(X)


def test_bad_items_are_all_listed_with_their_index(sample):
    X = [sample[0][0], None, float("nan"), 3, np.zeros((4, 4), dtype=np.float32), ""]
    with pytest.raises(ImageInputError) as info:
        as_image_list(X)
    assert [i for i, _, _ in info.value.errors] == [1, 2, 3, 4, 5]
    message = str(info.value)
    assert "5 input(s) of X" in message and "[3]" in message and "Accepted:" in message


def test_identity_is_content_not_path(tmp_path, sample):
    src = Path(sample[0][0])
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(src.read_bytes())
    assert read_item(str(src))[0] == read_item(copy)[0] == read_item(src.read_bytes())[0]
    other = read_item(sample[0][1])[0]
    assert other != read_item(copy)[0]
    copy.write_bytes(Path(sample[0][1]).read_bytes())  # the file changes on disk
    assert read_item(copy)[0] == other


def test_pil_identity_covers_palette_and_orientation():
    pixels = Image.new("P", (4, 4))
    red, blue = pixels.copy(), pixels.copy()
    red.putpalette([255, 0, 0] * 256)
    blue.putpalette([0, 0, 255] * 256)
    assert read_item(red)[0] != read_item(blue)[0]
    turned = Image.new("RGB", (4, 4))
    turned.getexif()[0x0112] = 6
    assert read_item(turned)[0] != read_item(Image.new("RGB", (4, 4)))[0]
