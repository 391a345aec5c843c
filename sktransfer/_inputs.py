"""Stage 1: what the user passes in.

Turns the many shapes of ``X`` a user may pass (paths, bytes, PIL images,
arrays; in a list, an ndarray, a pandas Series or a one-column frame) into a
flat list of image items, and gives each item a content identity used as the
feature-cache key. Nothing here decodes pixels.
"""

from __future__ import annotations

import collections
import numbers
import os
import stat
import warnings
from pathlib import Path, PurePath

import numpy as np
from PIL import Image

from ._cache import digest, file_digest, new_hasher

__all__ = ["load_image_folder", "ImageInputError"]

#: File name endings read by :func:`load_image_folder`.
def _image_extensions():
    """The endings of the image files a folder is read for: the common photo and bitmap
    formats, and those Pillow reads only with a library or plugin present (AVIF, JPEG 2000,
    HEIF through pillow-heif) where this Pillow registers a reader for them."""
    from PIL import Image

    common = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
              ".ppm", ".pgm", ".pbm", ".pnm")
    readers = Image.registered_extensions()
    optional = (".avif", ".jp2", ".j2k", ".jpx", ".heic", ".heif")
    return common + tuple(e for e in optional if readers.get(e) in Image.OPEN)


IMAGE_EXTENSIONS = _image_extensions()


class ImageInputError(ValueError):
    """Raised when one or more images cannot be used.

    The message lists every offending input with its reason; the same
    information is available as ``errors``, a list of ``(index, item, reason)``.
    """

    def __init__(self, errors, name="X"):
        self.errors = list(errors)
        self.name = name
        super().__init__("\n".join([
            f"{len(self.errors)} input(s) of {name} cannot be used as images:",
            *self.listing(lambda i, item: f"[{i}] {_describe(item)}"),
            "Accepted: paths (str or pathlib.Path) to image files Pillow can read, "
            "encoded image bytes, PIL images, or HxWx3 / HxW uint8 arrays.",
        ]))

    def listing(self, describe):
        """One line per bad input, ``describe(index, item)`` and the reason; the first 50, then a count."""
        shown = self.errors[:50]
        lines = [f"  {describe(i, item)}: {reason}" for i, item, reason in shown]
        if len(self.errors) > len(shown):
            lines.append(f"  ... and {len(self.errors) - len(shown)} more (see .errors)")
        return lines

    def __reduce__(self):
        return (type(self), (self.errors, self.name))


def _describe(item):
    if isinstance(item, (str, os.PathLike)):
        return repr(os.fspath(item))
    if isinstance(item, bytes):
        return f"<{len(item)} bytes>"
    if isinstance(item, np.ndarray):
        return f"<ndarray shape={item.shape} dtype={item.dtype}>"
    return f"<{type(item).__name__}>"


def load_image_folder(root):
    """Read image paths and labels from a folder with one sub-folder per class.

    Parameters
    ----------
    root : str or path-like
        A folder whose sub-folders are the class names, each holding image
        files (``.jpg``, ``.png``, ... in any letter case), directly or in
        sub-folders of its own (as torchvision's ``ImageFolder`` reads them).
        Linked folders are followed, each real folder once per class; a
        link back to the class folder or a folder above it (a loop) is not
        entered, and a folder of another class (a class folder, or a link
        into one) is not read as this class too.
        Hidden files and folders are skipped. Other files in the class
        folders, broken links, sub-folders that cannot be read, folders of
        another class, and images directly in ``root``, are skipped with a
        warning that counts them; a class folder without any image file,
        and two class folders that are one folder (a link), are errors.

    Returns
    -------
    paths : list of str
        Image paths, sorted by class name and then by the names on the path
        below the class folder, compared as text (letter case counts), so
        the order, and every seeded split of it, is the same on every
        system.
    labels : ndarray of str
        The class (sub-folder name) of each path.

    Examples
    --------
    >>> from sktransfer import load_image_folder
    >>> paths, labels = load_image_folder("sktransfer/data/trash_sample")
    >>> len(paths), sorted(set(labels.tolist()))
    (180, ['cardboard', 'glass', 'metal', 'paper', 'plastic', 'trash'])
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(
            f"load_image_folder: {str(root)!r} is not a folder; expected a folder "
            "with one sub-folder of images per class."
        )
    paths, labels, skipped, unread, empty = [], [], [], [], []
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    # Each class's walk stays out of the others' folders: a photo gets one label.
    class_folders = [os.path.realpath(p) for p in class_dirs]
    first = {}
    for class_dir, real in zip(class_dirs, class_folders):
        if first.setdefault(real, class_dir.name) != class_dir.name:
            raise ValueError(
                f"load_image_folder: class folders {first[real]!r} and {class_dir.name!r} in {str(root)!r} are "
                "one folder (one links to the other), whose photos would get both labels; remove the link, "
                "or give each class its own folder."
            )
    for class_dir in class_dirs:
        files = image_files(class_dir, skipped, unread, outside=class_folders)
        if not files:
            empty.append(class_dir.name)
        paths += files
        labels += [class_dir.name] * len(files)
    if skipped or unread:  # before the errors below: a class folder that cannot be read looks empty
        warnings.warn(
            f"load_image_folder skipped {skipped_count(skipped, unread)} in the class folders "
            f"of {str(root)!r}: {skipped_text(skipped, unread)}.",
            UserWarning, stacklevel=2,
        )
    accepted = ", ".join(IMAGE_EXTENSIONS)
    loose = sorted(p.name for p in root.iterdir() if _is_image_name(p) and p.is_file())
    if not paths:
        raise ValueError(
            f"load_image_folder: found no images in {str(root)!r}; expected sub-folders "
            f"(one per class) holding files ending in {accepted}"
            + (f" ({_count(loose, 'image file')} directly in it: each class needs a sub-folder)." if loose else ".")
        )
    if empty:
        raise ValueError(
            f"load_image_folder: class folder(s) {', '.join(map(repr, empty))} hold no image files "
            f"(files ending in {accepted}, any letter case); add images, or remove the folder(s)."
        )
    if loose:
        warnings.warn(
            f"load_image_folder skipped {_count(loose, 'image file')} directly in {str(root)!r}, in no "
            f"class folder: {', '.join(map(repr, loose[:5]))}{', ...' if len(loose) > 5 else ''}.",
            UserWarning, stacklevel=2,
        )
    return paths, np.asarray(labels)


def skipped_text(skipped, unread):
    """Why :func:`image_files` left out the paths ``skipped`` (not named as images) and the
    entries ``unread`` (broken links, folders that cannot be read, ...), with how many of each
    and the first, for a warning."""
    reasons = []
    if skipped:
        endings = collections.Counter(Path(p).suffix.lower() or "(none)" for p in skipped)
        reasons.append(
            f"{len(skipped)} whose names are not those of images ({dict(endings.most_common())}), "
            f"e.g. {skipped[0]!r}; read are files ending in {', '.join(IMAGE_EXTENSIONS)}. Convert or "
            "rename them to include them"
        )
    groups = {}
    for entry in unread:
        groups.setdefault((entry.kind, entry.reason), []).append(entry.path)
    for (kind, reason), paths in groups.items():
        one, many = _UNREAD_KINDS[kind]
        what = (one if len(paths) == 1 else many).format(reason=reason)
        reasons.append(f"{len(paths)} {what}, e.g. {paths[0]!r}")
    return ". ".join(reasons)


def skipped_count(skipped, unread):
    """How many files and folders :func:`image_files` left out, in words ("2 files and 1 folder")."""
    folders = sum(entry.kind in _FOLDER_KINDS for entry in unread)
    files = len(skipped) + len(unread) - folders
    return " and ".join(_count(n, noun) for n, noun in ((files, "file"), (folders, "folder")) if n)


#: An entry :func:`image_files` could not read, or would not: its path, what it is (a key of
#: ``_UNREAD_KINDS``) and, for a folder that cannot be read, the system's reason.
Unread = collections.namedtuple("Unread", "path kind reason", defaults=("",))
#: What each kind of ``Unread`` entry is, in words: for one, and for several.
_UNREAD_KINDS = {
    "broken link": ("broken link (pointing at nothing)", "broken links (pointing at nothing)"),
    "not a file": ("entry that is not a file (a pipe, socket or device)",
                   "entries that are not files (pipes, sockets or devices)"),
    "unreadable folder": ("folder that cannot be read ({reason})", "folders that cannot be read ({reason})"),
    "other class": ("folder of another class (a class folder or a link into one; read as that class)",
                    "folders of another class (a class folder or a link into one; read as that class)"),
    "other class file": ("linked file of another class (a link to a photo in another class folder; read as "
                         "that class)", "linked files of another class (links to photos in another class "
                         "folder; read as that class)"),
}
_FOLDER_KINDS = ("unreadable folder", "other class")


def _count(n, noun):
    """``n`` ``noun``s, singular for one: ``n`` a number or a collection (its length)."""
    n = n if isinstance(n, numbers.Integral) else len(n)
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _is_image_name(path):
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_files(folder, skipped=None, unread=None, outside=()):
    """The image files under ``folder``, in its sub-folders too, sorted by :func:`path_key`.

    Linked folders are followed (as torchvision's ``ImageFolder`` walks),
    each real folder once: a link back to ``folder`` or a folder above it
    (a loop) is not entered, and a folder reached by two names is read
    under the one the walk, in sorted order, reaches first.
    Files and folders whose names start with ``.`` are left out, and so are
    files whose extension is not in :data:`IMAGE_EXTENSIONS` (any letter
    case); those are appended to ``skipped`` (a list) when given. Entries
    not read are appended to ``unread`` as :class:`Unread` when given:
    broken links, other entries that are not files (pipes, sockets),
    sub-folders that cannot be listed (no permission), and folders in
    ``outside`` and links to files in them.
    ``outside``: real paths of folders not to enter, nor anything under
    them (the other class folders of :func:`load_image_folder`); one that
    holds ``folder`` itself is ignored.
    """
    top = os.path.realpath(folder)
    outside = [o for o in map(os.path.realpath, outside) if not _within(top, o)]
    unread = [] if unread is None else unread
    found = []
    visited = {top}

    def cannot_list(error):
        unread.append(Unread(error.filename, "unreadable folder", error_reason(error)))

    start = str(Path(folder))
    for parent, folders, names in os.walk(start, followlinks=True, onerror=cannot_list):
        # Pruned in place, sorted: the walk skips hidden and visited folders, in the same order everywhere.
        kept = []
        for name in sorted(folders):
            if name.startswith("."):
                continue
            real = os.path.realpath(os.path.join(parent, name))
            if real in visited or _within(top, real):  # read already, or a loop
                continue
            if any(_within(real, other) for other in outside):
                unread.append(Unread(os.path.join(parent, name), "other class"))
                continue
            visited.add(real)
            kept.append(name)
        folders[:] = kept
        below = PurePath(os.path.relpath(parent, start))
        for name in names:
            path = os.path.join(parent, name)
            if name.startswith("."):
                continue
            if not os.path.isfile(path):
                unread.append(Unread(path, "broken link" if os.path.islink(path) else "not a file"))
            elif outside and os.path.islink(path) and any(_within(os.path.realpath(path), o) for o in outside):
                unread.append(Unread(path, "other class file"))  # that class's photo, labelled there
            elif _is_image_name(Path(name)):
                found.append((path_key(below / name), path))
            elif skipped is not None:
                skipped.append(path)
    return [path for _, path in sorted(found)]


def path_key(relative):
    """The sort key of a path ``relative`` to the folder listed (a ``PurePath`` of any system):
    its names, compared one by one as text, letter case counting.

    So a folder lists in the same order on every system: sorting whole path
    strings compares the separator (``/``, or ``\\`` on Windows) with the
    characters of names (``a/x/1.jpg`` against ``a/x0.jpg``), and pathlib
    sorts Windows paths ignoring case.
    """
    return relative.parts


def _within(path, folder):
    """Whether the real path ``path`` is the real path ``folder`` or under it."""
    return path == folder or path.startswith(os.path.join(folder, ""))


def as_image_list(X, name="X"):
    """Validate the container ``X`` and return its items as a list.

    Raises ``ValueError``/``TypeError`` naming ``name`` and what is accepted.
    The items themselves (their type, whether a file exists and decodes) are
    checked when the images are read, all in one pass, so that one
    :class:`ImageInputError` lists every bad item whatever is wrong with it.
    """
    if X is None:
        raise ValueError(f"{name} is None; expected a list of image paths or images.")
    if isinstance(X, (str, bytes, os.PathLike, Image.Image)):
        raise TypeError(
            f"{name} must be a sequence of images, got a single {type(X).__name__}; "
            f"wrap it in a list: [{name}]."
        )
    if hasattr(X, "iloc") and hasattr(X, "columns"):  # pandas DataFrame
        if X.shape[1] != 1:
            raise ValueError(
                f"{name} is a DataFrame with {X.shape[1]} columns; expected one column of "
                "image paths (select it, or use ImageEmbedder in a ColumnTransformer)."
            )
        X = X.iloc[:, 0]
    if hasattr(X, "to_numpy") and not isinstance(X, np.ndarray):  # pandas Series
        X = X.to_numpy(dtype=object)
    if isinstance(X, np.ndarray):
        if X.dtype == np.uint8 and X.ndim == 4:
            items = list(X)  # a batch of N x H x W x C images
        elif X.dtype.kind in "OUS" and X.ndim == 2 and X.shape[1] == 1:
            items = list(X[:, 0])
        elif X.dtype.kind in "OUS" and X.ndim == 1:
            items = list(X)
        else:
            raise ValueError(
                f"{name} is an ndarray of shape {X.shape} and dtype {X.dtype}; expected a 1-D "
                "array of paths (or a one-column 2-D one), or an N x H x W x 3 uint8 array of images."
            )
    else:
        try:
            items = list(X)
        except TypeError:
            raise TypeError(
                f"{name} must be a sequence of images (list, ndarray, pandas Series), "
                f"got {type(X).__name__}."
            ) from None
    if len(items) == 0:
        raise ValueError(f"{name} is empty; expected at least one image.")
    return items


def _item_type_error(item):
    if isinstance(item, np.str_):
        item = str(item)
    if isinstance(item, (str, os.PathLike)):
        return "empty path" if os.fspath(item) in ("", b"") else None
    if isinstance(item, (bytes, bytearray, memoryview)):
        return "empty bytes" if len(item) == 0 else None
    if isinstance(item, Image.Image):
        return None
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            return f"array dtype is {item.dtype}; expected uint8"
        if item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (1, 3, 4)):
            return None if item.size else "array is empty"
        return f"array shape is {item.shape}; expected H x W x 3 (or H x W)"
    if item is None:
        return "None is not an image"
    if isinstance(item, float) and np.isnan(item):
        return "NaN is not an image"
    return f"{type(item).__name__} {item!r:.40} is not an image or a path"


#: Files above this size are identified as images before they are read whole
#: for hashing, so a huge file of another kind is refused after its header.
HEADER_FIRST_BYTES = 1 << 24


def error_reason(error):
    """A short reason, in words, for an exception raised while reading an item."""
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, IsADirectoryError):
        return "is a folder, not an image file"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[:1].lower() + error.strerror[1:]  # the words, not the errno number
    text = str(error.args[0]) if getattr(error, "args", None) else str(error)
    return text or type(error).__name__


def read_item(item):
    """Return ``(identity, payload)`` for one item.

    ``identity`` is a hex digest of the image content (the file's bytes for
    paths and bytes, the pixels for arrays and PIL images), so a moved or
    copied file keeps its cached features and an edited file never gets
    stale ones (see :func:`sktransfer._cache.file_digest`). ``payload`` is
    what :func:`sktransfer._images.open_image` decodes: the path for files,
    else the item itself; a file is hashed again when it is decoded, and its
    features are stored under the digest of the bytes decoded.

    Raises ``OSError``/``ValueError``/``TypeError`` with a short reason for
    unusable items.
    """
    wrong_type = _item_type_error(item)
    if wrong_type:
        raise TypeError(wrong_type)
    if isinstance(item, (str, os.PathLike, np.str_)):
        path = os.fspath(item)
        st = os.stat(path)  # FileNotFoundError / PermissionError carry the reason
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError("is a folder, not an image file")
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file (a pipe, socket or device)")
        if st.st_size == 0:
            raise ValueError("file is empty (0 bytes)")
        if st.st_size > HEADER_FIRST_BYTES:
            try:
                Image.open(path).close()  # reads the header only
            except Image.UnidentifiedImageError:
                raise ValueError("not an image file Pillow can read") from None
            except Exception:  # noqa: BLE001  (other header faults are reported by the decoder)
                pass
        # The path, not the bytes: holding every file's bytes until its batch is
        # decoded would grow memory with the data set; the re-read hits the OS cache.
        return file_digest(path, st), path
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        return digest(data), data
    if isinstance(item, Image.Image):
        h = new_hasher()
        h.update(f"{item.mode}{item.size}".encode())
        h.update(item.tobytes())
        # What decoding applies besides the pixels: the palette, transparency, EXIF orientation.
        h.update(bytes(item.getpalette() or []))
        h.update(repr((item.info.get("transparency"), item.getexif().get(0x0112))).encode())
        return h.hexdigest(), item
    arr = np.ascontiguousarray(item)
    h = new_hasher()
    h.update(f"{arr.shape}".encode())
    h.update(arr.data)
    return h.hexdigest(), arr
