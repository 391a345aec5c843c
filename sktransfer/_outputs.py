"""Files a user reads: written whole or not at all, with text every writer and spreadsheet takes.

Used by the disk cache, ``save_model``, the audit report and the command
line, so each output is written one way.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import re
import secrets
import stat

#: Name prefix of temporary files before their rename (``clear_cache`` knows it).
TEMP_PREFIX = ".tmp-"


def write_atomic(path, data, mode=None, makedirs=False, durable=True, follow_links=True, root=None):
    """Write ``data`` (bytes) to ``path`` through a temporary file and a rename.

    A reader sees the old file or the whole new one, never a part, even when
    the writer is killed; a failed write leaves no temporary file behind.
    ``mode``: the file's permissions; by default an existing file keeps its
    own, and a new one gets those the umask leaves, as for any file a program
    creates (0644 under the usual umask 022).
    A ``path`` that is a symbolic link stays one: the file it points to is
    written, as an editor or ``cp`` would; with ``follow_links=False`` the
    link itself is replaced, and no folder between ``root`` (by default the
    folder of ``path``) and the file is reached through a link: the write is
    refused (``OSError``, ELOOP) instead (the caches: a link planted in a
    shared folder must not lead a write elsewhere; ``root``, the folder the
    user named, may itself be one).
    ``makedirs``: missing folders are made (see :func:`make_folders`).
    ``durable``: the bytes reach the disk before the rename makes them
    visible, and the rename after it (the folder is synced too), so a power
    cut leaves the old file or the new one, not an empty one. The disk cache
    passes False: a torn entry fails its checksum and is recomputed, and a
    sync per image would slow embedding down.
    A ``path`` that is (or links to) something other than a file or a
    folder, a FIFO, a terminal or a device (``/dev/stdout``, ``/dev/fd/N``,
    ``/dev/null``), is opened and written to, as a shell's ``>`` does: a
    file renamed over it would replace it, and its reader would never get
    the bytes. With ``follow_links=False`` (the caches) only a new name or a
    regular file is expected, and anything else is replaced.
    """
    if follow_links and is_stream(path):
        with open(path, "wb") as stream:  # the name given: /dev/stdout's target, "pipe:[...]", is no path
            stream.write(data)
        return
    given = os.fspath(path)
    try:
        if follow_links:
            folder, name = os.path.split(os.path.realpath(given))
            if makedirs:
                make_folders(folder, durable=durable)
            _write_in(None, folder, name, data, mode, durable, follow_links)
        else:
            folder, name = os.path.split(os.path.abspath(given))
            root = folder if root is None else os.path.abspath(root)
            names = [] if folder == root else os.path.relpath(folder, root).split(os.sep)
            if os.pardir in names:
                raise ValueError(f"{given!r} is not in root={root!r}.")
            with folder_below(root, names, create=makedirs, durable=durable) as (fd, folder):
                _write_in(fd, folder, name, data, mode, durable, follow_links)
    except OSError as e:
        if e.errno is None or (e.filename == given and e.filename2 is None):
            raise
        # Said of the path given, not of the temporary file beside it nor of a link's target.
        raise OSError(e.errno, e.strerror, given) from None


def _write_in(fd, folder, name, data, mode, durable, follow_links):
    """Write ``name`` in ``folder`` (whose descriptor is ``fd``, or None: see :func:`folder_below`)."""
    def at(entry):
        return in_folder(fd, folder, entry)

    if mode is None:
        try:
            existing = os.stat(at(name), dir_fd=fd, follow_symlinks=follow_links)
            if stat.S_ISREG(existing.st_mode):
                mode = stat.S_IMODE(existing.st_mode)
        except OSError:  # a new file
            pass
    # Not tempfile.mkstemp, whose file is 0600 whatever the umask: the kernel applies the umask to 0666 here.
    tmp = TEMP_PREFIX + secrets.token_hex(8)
    out = os.open(at(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666, dir_fd=fd)
    try:
        if mode is not None and hasattr(os, "fchmod"):
            os.fchmod(out, mode)
        with os.fdopen(out, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(at(tmp), at(name), src_dir_fd=fd, dst_dir_fd=fd)
    except BaseException:
        try:
            os.unlink(at(tmp), dir_fd=fd)
        except OSError:
            pass
        raise
    if durable:
        sync_folder(folder, fd)


#: Folders are walked by descriptor where the platform can (POSIX): each level opened
#: without following a link, and the files in the last named relative to its descriptor,
#: so a link planted after the check is not followed either. Elsewhere (Windows) each
#: level is checked with lstat, and paths are used.
_BY_DESCRIPTOR = (hasattr(os, "O_DIRECTORY") and hasattr(os, "O_NOFOLLOW")
                  and {os.open, os.stat, os.mkdir, os.rename, os.unlink, os.rmdir} <= os.supports_dir_fd)
_FOLDER_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


@contextlib.contextmanager
def folder_below(root, names, create=False, durable=False):
    """``(fd, path)`` of the folder ``root/names[0]/names[1]/...``, reached without
    following a symbolic link at any level below ``root`` (``root`` itself may be
    one: the user named it).

    ``fd`` is the folder's open descriptor (None where the platform walks by
    path); name its entries with :func:`in_folder` and pass ``dir_fd=fd``.
    A level that is a link (or a Windows junction) raises ``OSError`` (ELOOP),
    one that is missing ``FileNotFoundError``, unless ``create``: missing
    levels are made then (``durable``: each made one is synced in its parent).
    """
    path = root
    if create and not os.path.isdir(root):
        make_folders(root, durable=durable)
    if not _BY_DESCRIPTOR:
        for name in names:
            path = os.path.join(path, name)
            _check_level(path, create, durable)
        yield None, path
        return
    fd = None
    try:
        if not names:
            fd = os.open(root, _FOLDER_FLAGS)
        for name in names:
            path = os.path.join(path, name)
            # The first level by its whole path (O_NOFOLLOW guards only the last part: the
            # user's root may hold links), the next ones relative to the level above.
            parent, fd = fd, None  # closed by _open_level, opened or not
            fd = _open_level(parent, name if parent is not None else path, path, create, durable)
        yield fd, path
    finally:
        if fd is not None:
            os.close(fd)


def _open_level(parent, name, path, create, durable):
    """The descriptor of folder ``name`` in ``parent`` (a descriptor, or None for a whole path), not a link;
    closes ``parent``."""
    try:
        while True:
            try:
                return os.open(name, _FOLDER_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
            except FileNotFoundError:
                if not create:
                    raise
            try:
                os.mkdir(name, dir_fd=parent)
            except FileExistsError:  # made meanwhile by another writer
                continue
            if durable:
                sync_folder(os.path.dirname(path), parent)
    except OSError as e:
        if not isinstance(e, FileNotFoundError) and _is_link(name, parent):
            raise _linked(path) from None
        raise OSError(e.errno, e.strerror, path) from None
    finally:
        if parent is not None:
            os.close(parent)


def _check_level(path, create, durable):
    """Refuse ``path`` unless it is a folder, not a link; make it first when missing and ``create``."""
    if create and not os.path.lexists(path):
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        else:
            if durable:
                sync_folder(os.path.dirname(path))
    if _is_link(path, None):
        raise _linked(path)
    if not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", path)


def _is_link(name, dir_fd):
    """Whether ``name`` (in folder ``dir_fd``) is a symbolic link or a Windows junction."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISLNK(st.st_mode) or bool(getattr(st, "st_file_attributes", 0) & _REPARSE_POINT)


_REPARSE_POINT = getattr(stat, "FILE_ATTRIBUTE_REPARSE_POINT", 0x400)


def _linked(path):
    return OSError(errno.ELOOP, f"{path!r} is a symbolic link, not followed")


def in_folder(fd, folder, name):
    """How os functions called with ``dir_fd=fd`` name the entry ``name`` of ``folder``
    (a :func:`folder_below`): by its name alone, or by its path where there is no descriptor."""
    return name if fd is not None else os.path.join(folder, name)


def is_stream(path):
    """Whether ``path`` names, through any links, an existing entry that is neither a regular file nor
    a folder: a FIFO, a socket, a terminal or another device."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # a new name (or one that cannot be reached: the temporary file's write says why)
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def make_folders(folder, durable=True):
    """``os.makedirs(folder, exist_ok=True)``; with ``durable``, each folder it
    made has its entry synced in its parent, so a power cut cannot lose a level
    of the path above files synced inside it."""
    missing = []
    level = os.path.abspath(folder)
    while not os.path.isdir(level) and os.path.dirname(level) != level:
        missing.append(level)
        level = os.path.dirname(level)
    os.makedirs(folder, exist_ok=True)
    if durable:
        for level in reversed(missing):
            sync_folder(os.path.dirname(level))


def sync_folder(folder, fd=None):
    """Make a rename in ``folder`` (open as ``fd`` when given) durable (POSIX); a no-op where
    folders cannot be opened (Windows)."""
    if fd is not None:
        try:
            os.fsync(fd)
        except OSError:
            pass
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def relative_href(path, page_folder):
    """The ``href`` (URL-quoted, HTML-escaped) of the file ``path`` in a page written in
    ``page_folder``: relative, so the page and the images can move together; the path's
    bytes quoted, so a name that is not UTF-8 still links to its file."""
    import html
    import urllib.parse

    relative = os.path.relpath(os.path.abspath(os.fspath(path)), os.path.abspath(page_folder))
    return html.escape(urllib.parse.quote(os.fsencode(relative)))


def safe_text(value):
    """``value`` as text every writer accepts: a file name's bytes that are not
    UTF-8 (kept by Python as surrogates) become ``\\xNN`` escapes."""
    text = str(value)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "backslashreplace")
        return raw.decode("utf-8", "backslashreplace")


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def csv_cell(value):
    """A CSV cell a spreadsheet shows as text: one that would start a formula gets a leading ``'``."""
    text = safe_text(value)
    if text.startswith(("=", "+", "-", "@", "\t", "\r")) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def csv_text(rows, lineterminator="\r\n"):
    """``rows`` as CSV text, each cell through :func:`csv_cell` (empty for None)."""
    text = io.StringIO(newline="")
    csv.writer(text, lineterminator=lineterminator).writerows(
        [["" if v is None else csv_cell(v) for v in row] for row in rows])
    return text.getvalue()
