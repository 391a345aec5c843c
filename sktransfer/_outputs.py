"""Files a user reads: written whole or not at all, with text every writer and spreadsheet takes.

Used by the disk cache, ``save_model``, the audit report and the command
line, so each output is written one way.
"""

from __future__ import annotations

import csv
import io
import os
import re
import secrets
import stat

#: Name prefix of temporary files before their rename (``clear_cache`` knows it).
TEMP_PREFIX = ".tmp-"


def write_atomic(path, data, mode=None, makedirs=False, durable=True, follow_links=True):
    """Write ``data`` (bytes) to ``path`` through a temporary file and a rename.

    A reader sees the old file or the whole new one, never a part, even when
    the writer is killed; a failed write leaves no temporary file behind.
    ``mode``: the file's permissions; by default an existing file keeps its
    own, and a new one gets those the umask leaves, as for any file a program
    creates (0644 under the usual umask 022).
    A ``path`` that is a symbolic link stays one: the file it points to is
    written, as an editor or ``cp`` would; with ``follow_links=False`` the
    link itself is replaced (the caches: a link planted in a shared folder
    must not lead a write elsewhere).
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
    if follow_links and _is_stream(path):
        with open(path, "wb") as stream:  # the name given: /dev/stdout's target, "pipe:[...]", is no path
            stream.write(data)
        return
    given = os.fspath(path)
    try:
        _replace(given, data, mode, makedirs, durable, follow_links)
    except OSError as e:
        if e.errno is None or (e.filename == given and e.filename2 is None):
            raise
        # Said of the path given, not of the temporary file beside it nor of a link's target.
        raise OSError(e.errno, e.strerror, given) from None


def _replace(path, data, mode, makedirs, durable, follow_links):
    path = os.path.realpath(path) if follow_links else os.path.abspath(path)
    folder = os.path.dirname(path)
    if makedirs:
        make_folders(folder, durable=durable)
    if mode is None:
        try:
            existing = os.stat(path) if follow_links else os.lstat(path)
            if stat.S_ISREG(existing.st_mode):
                mode = stat.S_IMODE(existing.st_mode)
        except OSError:  # a new file
            pass
    # Not tempfile.mkstemp, whose file is 0600 whatever the umask: the kernel applies the umask to 0666 here.
    tmp = os.path.join(folder, TEMP_PREFIX + secrets.token_hex(8))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if mode is not None and hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        sync_folder(folder)


def _is_stream(path):
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


def sync_folder(folder):
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
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
