import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sktransfer import ImageEmbedder, ImageInputError, load_image_folder
from sktransfer._inputs import HEADER_FIRST_BYTES, as_image_list, read_item


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
    with pytest.warns(UserWarning, match="skipped 1 file in the class folders"):
        paths, labels = load_image_folder(tmp_path)
    assert [Path(p).name for p in paths] == ["x.PNG"] and list(labels) == ["a"]
    with pytest.raises(ValueError, match="not a folder"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found no images"):
        load_image_folder(tmp_path / "empty")


def test_load_image_folder_reads_every_jpeg_ending_and_tells_what_it_skips(tmp_path):
    """Nothing is dropped silently: JPEGs named .jfif or .jpe are read; other files in the class
    folders, and images outside them, are counted in a warning; a class folder with no image
    is an error naming it (torchvision's ImageFolder refuses it too), not a class gone from y."""
    for name in ("a/1.jpg", "a/2.jfif", "a/3.JPE", "b/4.png", "loose.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG" if name.endswith("png") else "JPEG")
    (tmp_path / "a" / "notes.txt").write_text("hello")
    (tmp_path / "b" / "5.heic").write_bytes(b"not read")
    (tmp_path / "README.md").write_text("about the photos")  # not an image: no word about it
    with pytest.warns(UserWarning) as caught:
        paths, labels = load_image_folder(tmp_path)
    assert [Path(p).name for p in paths] == ["1.jpg", "2.jfif", "3.JPE", "4.png"] and list(labels) == list("aaab")
    message = " ".join(str(w.message) for w in caught)
    assert "skipped 2 files in the class folders" in message and "'.heic': 1" in message and "'.txt': 1" in message
    assert "1 image file directly in" in message and "loose.jpg" in message
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "6.avi").write_bytes(b"")
    with pytest.raises(ValueError, match=r"class folder\(s\) 'c' hold no image files"):
        load_image_folder(tmp_path)


def test_load_image_folder_reads_nested_folders_of_each_class(tmp_path):
    """Photos in sub-folders of a class folder (by date, by camera) belong to that class, as in
    torchvision's ImageFolder and as `sktransfer predict` reads a folder; none is left out."""
    for name in ("a/1.jpg", "a/2019/2.jpg", "a/2019/05/3.png", "b/4.jpg", "b/.cache/5.jpg", "b/.6.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    paths, labels = load_image_folder(tmp_path)
    assert [Path(p).relative_to(tmp_path).as_posix() for p in paths] == ["a/1.jpg", "a/2019/05/3.png",
                                                                         "a/2019/2.jpg", "b/4.jpg"]
    assert list(labels) == ["a", "a", "a", "b"]


def test_load_image_folder_follows_linked_folders_once_and_counts_broken_links(tmp_path, sample):
    """As torchvision's ImageFolder walks (following links): photos in a linked sub-folder of a
    class are read; a link back to a folder above ends the walk instead of looping; a folder
    reached twice is read once; a link to nothing is counted in the warning, not dropped unseen."""
    photos = sample[0]
    elsewhere = tmp_path / "elsewhere" / "2019"
    elsewhere.mkdir(parents=True)
    shutil.copy(photos[0], elsewhere / "1.jpg")
    shutil.copy(photos[1], tmp_path / "elsewhere" / "0.jpg")
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (data / "b").mkdir()
    shutil.copy(photos[2], data / "a" / "2.jpg")
    shutil.copy(photos[40], data / "b" / "3.jpg")
    (data / "a" / "2019").symlink_to(elsewhere)           # a linked sub-folder of a class
    (data / "a" / "again").symlink_to(elsewhere)          # the same folder by another name
    (data / "a" / "sub").mkdir()
    (data / "a" / "sub" / "up").symlink_to(data / "a")    # back to an ancestor: no endless walk
    (data / "b" / "loop").symlink_to(data / "b")          # to itself
    (data / "b" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")  # a broken link
    (data / "c").symlink_to(tmp_path / "elsewhere")       # a linked class folder
    with pytest.warns(UserWarning) as caught:
        paths, labels = load_image_folder(data)
    assert [Path(p).relative_to(data).as_posix() for p in paths] == [
        "a/2.jpg", "a/2019/1.jpg", "b/3.jpg", "c/0.jpg", "c/2019/1.jpg"]
    assert list(labels) == ["a", "a", "b", "c", "c"]
    message = " ".join(str(w.message) for w in caught)
    assert "skipped 1 file in the class folders" in message and "1 broken link" in message
    assert "gone.jpg" in message
    with pytest.warns(UserWarning, match="1 broken link"):
        assert paths == load_image_folder(data)[0]  # the same order every time


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


def test_wrong_types_and_unreadable_files_are_listed_in_one_error(tmp_path, sample):
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    X = [sample[0][0], None, str(tmp_path / "missing.jpg"), float("nan"), 3, str(text),
         np.zeros((4, 4), dtype=np.float32), ""]
    assert as_image_list(X) == X  # the container is fine; the items are checked when read
    with pytest.raises(ImageInputError) as info:
        ImageEmbedder().fit().transform(X)
    assert [i for i, _, _ in info.value.errors] == [1, 2, 3, 4, 5, 6, 7]
    message = str(info.value)
    assert "7 input(s) of X" in message and "file not found" in message and "not an image file" in message
    assert "None is not an image" in message and "Accepted:" in message


def test_reasons_are_words_not_errno_numbers(tmp_path):
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    long_name = tmp_path / ("x" * 300 + ".jpg")
    with pytest.raises(ImageInputError) as info:
        ImageEmbedder().fit().transform([str(loop), str(long_name)])
    reasons = [reason for _, _, reason in info.value.errors]
    assert reasons == ["too many levels of symbolic links", "file name too long"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_pipe_is_not_read_as_an_image(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        read_item(str(fifo))


def test_huge_non_image_is_refused_after_its_header(tmp_path):
    huge = tmp_path / "video.jpg"
    with open(huge, "wb") as f:
        f.write(b"this is a text file, not a picture\n")
        f.truncate(HEADER_FIRST_BYTES + 1)  # sparse: takes no disk space
    with pytest.raises(ValueError, match="not an image file Pillow can read"):
        read_item(str(huge))  # before: read and hashed whole, refused only later


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
