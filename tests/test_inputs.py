import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sktransfer import ImageEmbedder, ImageInputError, load_image_folder
from sktransfer._inputs import HEADER_FIRST_BYTES, as_image_list, path_key, read_item

from conftest import fresh_env


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
    with pytest.raises(ValueError, match=r"class folder\(s\) 'c' hold no image files"), \
            pytest.warns(UserWarning, match=r"skipped 3 files .*'\.avi': 1"):  # told first: it may be why
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
    (tmp_path / "other").mkdir()
    shutil.copy(photos[1], tmp_path / "other" / "0.jpg")
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
    (data / "c").symlink_to(tmp_path / "other")           # a linked class folder
    with pytest.warns(UserWarning) as caught:
        paths, labels = load_image_folder(data)
    assert [Path(p).relative_to(data).as_posix() for p in paths] == ["a/2.jpg", "a/2019/1.jpg", "b/3.jpg", "c/0.jpg"]
    assert list(labels) == ["a", "a", "b", "c"]
    message = " ".join(str(w.message) for w in caught)
    assert "skipped 1 file in the class folders" in message and "1 broken link" in message
    assert "gone.jpg" in message
    with pytest.warns(UserWarning, match="1 broken link"):
        assert paths == load_image_folder(data)[0]  # the same order every time


def _relative(paths, folder):
    return [Path(p).relative_to(folder).as_posix() for p in paths]


def test_a_link_to_the_data_root_or_another_class_never_labels_that_class_s_photos(tmp_path, sample):
    """A link in a class folder back to the data folder (``ln -s .. data/a/up``), or into another
    class folder, would read the other class's photos again under this class's name. The walk does
    not enter a link back to the folder walked or one above it (a loop), and skips a folder of
    another class with a warning that names it."""
    photos = sample[0]
    data = tmp_path / "data"
    for name, photo in (("a/1.jpg", 0), ("b/2.jpg", 40), ("b/2019/3.jpg", 41), ("c/4.jpg", 70)):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photos[photo], data / name)
    (data / "a" / "up").symlink_to("..")                  # the data folder, above the class folder
    (data / "a" / "b-2019").symlink_to(data / "b" / "2019")  # into another class folder
    (data / "c" / "b").symlink_to(Path("..") / "b")      # another class folder itself
    with pytest.warns(UserWarning) as caught:
        paths, labels = load_image_folder(data)
    assert _relative(paths, data) == ["a/1.jpg", "b/2.jpg", "b/2019/3.jpg", "c/4.jpg"]
    assert list(labels) == ["a", "b", "b", "c"]
    message = " ".join(str(w.message) for w in caught)
    assert "skipped 2 folders in the class folders" in message, message
    assert "2 folders of another class (a class folder or a link into one; read as that class)" in message
    assert str(data / "a" / "b-2019") in message and str(data / "a" / "up") not in message  # a loop: nothing left out
    (data / "d").symlink_to("b")  # two classes of one folder: an error, not a choice
    with pytest.raises(ValueError, match="class folders 'b' and 'd' .* are one folder"):
        load_image_folder(data)


def test_a_linked_photo_of_another_class_keeps_that_class_alone(tmp_path, sample):
    # A file linked into another class folder (ln -s ../cats/a.jpg dogs/a_link.jpg) is that
    # class's photo: skipped here with a warning, as a linked folder of another class is.
    photos = sample[0]
    data = tmp_path / "data"
    for name, photo in (("cats/a.jpg", 0), ("dogs/c.jpg", 40)):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photos[photo], data / name)
    (data / "dogs" / "a_link.jpg").symlink_to(Path("..") / "cats" / "a.jpg")
    (data / "dogs" / "own_link.jpg").symlink_to("c.jpg")  # a link within its own class: read
    with pytest.warns(UserWarning) as caught:
        paths, labels = load_image_folder(data)
    assert _relative(paths, data) == ["cats/a.jpg", "dogs/c.jpg", "dogs/own_link.jpg"]
    assert list(labels) == ["cats", "dogs", "dogs"]
    message = " ".join(str(w.message) for w in caught)
    assert "skipped 1 file in the class folders" in message, message
    assert "1 linked file of another class" in message and str(data / "dogs" / "a_link.jpg") in message


def test_a_sub_folder_that_cannot_be_read_is_told_not_dropped_silently(tmp_path, sample):
    photos = sample[0]
    data = tmp_path / "data"
    for name, photo in (("a/1.jpg", 0), ("a/2019/2.jpg", 1), ("b/3.jpg", 40)):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photos[photo], data / name)
    (data / "a" / "2019").chmod(0)
    try:
        paths, labels, messages = _load_image_folder_without_privileges(data)
    finally:
        (data / "a" / "2019").chmod(0o755)
    assert _relative(paths, data) == ["a/1.jpg", "b/3.jpg"] and labels == ["a", "b"]
    message = " ".join(messages)
    assert "skipped 1 folder in the class folders" in message, message
    assert "1 folder that cannot be read (permission denied), e.g." in message and "2019" in message


def _load_image_folder_without_privileges(folder):
    """``load_image_folder(folder)`` where file permissions apply: here when not root, else in a
    process started by ``setpriv`` without the capabilities that let root read any folder.
    Returns the paths, the labels (a list) and the warnings' messages."""
    if not hasattr(os, "geteuid"):
        pytest.skip("folder permissions that stop reading are POSIX")
    if os.geteuid() != 0:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            paths, labels = load_image_folder(folder)
        return paths, labels.tolist(), [str(w.message) for w in caught]
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("run as root (whom permissions do not stop) and without setpriv to drop that privilege")
    code = textwrap.dedent(f"""
        import json, warnings
        from sktransfer import load_image_folder
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            paths, labels = load_image_folder({str(folder)!r})
        print(json.dumps([paths, labels.tolist(), [str(w.message) for w in caught]]))
    """)
    done = subprocess.run([setpriv, "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-c", code],
                          env=fresh_env(), capture_output=True, text=True)
    if done.returncode != 0 and not done.stdout and "setpriv" in done.stderr:
        pytest.skip(f"run as root, and setpriv cannot drop the privilege here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_folder_order_is_the_same_on_every_system(tmp_path):
    """Sorting whole path strings compares the separator ('/' here, '\\' on Windows) with the
    characters of names, and pathlib sorts Windows paths ignoring case: the same folder was listed
    in another order there, and so gave other seeded splits. Class folders are sorted by name,
    and files by the names on their path, compared as text."""
    names = ["a/x0.jpg", "a/x-1.jpg", "a/x/1.jpg", "B/2.jpg"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    paths, labels = load_image_folder(tmp_path)
    expected = ["B/2.jpg", "a/x/1.jpg", "a/x-1.jpg", "a/x0.jpg"]
    assert _relative(paths, tmp_path) == expected and list(labels) == ["B", "a", "a", "a"]
    posix = sorted((PurePosixPath(n) for n in names), key=path_key)
    windows = sorted((PureWindowsPath(n.replace("/", "\\")) for n in names), key=path_key)
    assert [p.as_posix() for p in posix] == [p.as_posix() for p in windows] == expected
    assert [p.as_posix() for p in sorted(PureWindowsPath(n) for n in names)] != expected  # what pathlib does there


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


def test_every_photo_format_pillow_reads_here_is_found_in_a_folder(tmp_path):
    # AVIF (phones), JPEG 2000 (scans, medical images) and the portable bitmaps were read when
    # named one by one but skipped inside folders as "not images".
    from PIL import Image, features

    from sktransfer import load_image_folder

    picture = Image.new("RGB", (32, 24), (200, 30, 30))
    written = {".pbm": "1", ".pnm": "RGB"}
    if features.check("avif"):
        written[".avif"] = "RGB"
    if features.check("jpg_2000"):
        written.update({".jp2": "RGB", ".j2k": "RGB"})
    for i, (ending, mode) in enumerate(written.items()):
        folder = tmp_path / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        picture.convert(mode).save(folder / f"photo{ending.upper() if i == 0 else ending}",
                                   format={".pnm": "PPM", ".j2k": "JPEG2000"}.get(ending))
    paths, _ = load_image_folder(tmp_path)
    assert sorted(Path(p).suffix.lower() for p in paths) == sorted(written)
