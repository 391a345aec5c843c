"""Stage 4's memory: content digests, cache namespaces and the feature caches.

Every cache key in sktransfer is made here:

- :func:`digest` / :func:`new_hasher`: the content digest (BLAKE2b, 16 bytes)
  of an image's bytes or pixels, and of a backbone's weights;
- :func:`file_digest` / :func:`read_file`: the digest of a file, remembered
  per process in a memo that is never stale (see :func:`file_digest`);
- :func:`namespace`: a feature namespace derived from a backbone fingerprint
  and the parts that change its features (a view, a frozen prefix, ...);
- :func:`function_code` / :func:`class_code` / :func:`source_digest`: the
  code of a user's function or class and the text of the file that defines
  it, for the fingerprint of a user's module and the identity of a user's
  ``augment``;
- :class:`MemoryCache` (one per process) and :class:`DiskCache`
  (``cache_dir``), which store feature vectors under ``(namespace, digest)``.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import itertools
import numbers
import os
import re
import stat
import sys
import threading
import time
import types
import warnings

import numpy as np

from ._outputs import TEMP_PREFIX as _TEMP_PREFIX, folder_below, in_folder, write_atomic

__all__ = ["clear_cache", "cache_info", "set_memory_cache_size"]

DIGEST_SIZE = 16


def new_hasher():
    """An incremental hasher of the content digest (``update``, then ``hexdigest``)."""
    return hashlib.blake2b(digest_size=DIGEST_SIZE)


def digest(data):
    """The hex content digest of ``data`` (bytes-like)."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).hexdigest()


def namespace(fingerprint, *parts):
    """The cache namespace of features derived from ``fingerprint`` by ``parts``.

    ``namespace(fp)`` is ``fp`` itself; each part (a view's key, a prefix
    depth, an engine and its precision, ...) gives features a namespace of
    their own, so features computed differently never share an entry.
    """
    if not parts:
        return fingerprint
    return digest("|".join([fingerprint, *map(str, parts)]).encode())


def view_fingerprint(fingerprint, view):
    """The cache namespace of a view's features: the backbone's own without a view."""
    return fingerprint if view is None else namespace(fingerprint, "view", view.key)


# --------------------------------------------------------------------------
# Reading files: regular files only, never past the expected length

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
#: A FIFO opened without O_NONBLOCK waits for a writer; a regular file ignores it.
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def _read_regular(path, *, size=None, limit=None, follow_links=True, dir_fd=None):
    """``(stat, bytes)`` of the regular file at ``path`` (relative to the folder ``dir_fd`` when given).

    Opens without blocking (a FIFO would wait for a writer) and, when
    ``follow_links`` is False, refuses a symbolic link; raises ``OSError``
    for anything but a regular file, for a file whose size is not ``size``
    when given, and (EFBIG) for one larger than ``limit`` bytes when given,
    unread. Reads at most the size the file had when opened.
    """
    flags = _OPEN_FLAGS | _NONBLOCK | (0 if follow_links else getattr(os, "O_NOFOLLOW", 0))
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if size is not None and st.st_size != size:
            raise OSError(errno.EINVAL, f"holds {st.st_size} bytes, expected {size}")
        if limit is not None and st.st_size > limit:
            raise OSError(errno.EFBIG, f"holds {st.st_size} bytes, more than {limit}")
        chunks, left = [], st.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return st, b"".join(chunks)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# The file memo: a file's digest, read once per process while it is unchanged

#: A file changed less than this long before it was hashed is not memoised.
#: Its ctime might not move on a rewrite within the same timestamp tick (coarse
#: kernel clocks, 1-2 s on some network and FAT file systems); later, any
#: write moves the ctime past the one remembered.
RACY_SECONDS = 2.0
#: Paths the memo remembers at most (the least recently hashed are forgotten
#: first): about 30 MB, so a long-lived process that sees ever new files stays bounded.
FILE_MEMO_MAX = 100_000
_FILE_MEMO: collections.OrderedDict = collections.OrderedDict()
_FILE_MEMO_LOCK = threading.Lock()


def memo_key(st):
    """What tells one version of a file from another without reading it (``st`` from ``os.stat``)."""
    # ctime cannot be set by users (os.utime sets it to now), so a rewrite that
    # restores size and mtime still changes it; device and inode catch a rename.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _remember(path, st, value):
    if time.time_ns() - st.st_ctime_ns <= RACY_SECONDS * 1e9:
        return
    path = os.path.abspath(path)
    with _FILE_MEMO_LOCK:
        _FILE_MEMO[path] = (memo_key(st), value)
        _FILE_MEMO.move_to_end(path)
        while len(_FILE_MEMO) > FILE_MEMO_MAX:
            _FILE_MEMO.popitem(last=False)


def _recall(path):
    """``(key, digest)`` remembered for ``path`` (``(None, None)`` if none), now the most recent."""
    path = os.path.abspath(path)
    with _FILE_MEMO_LOCK:
        if path not in _FILE_MEMO:
            return None, None
        _FILE_MEMO.move_to_end(path)
        return _FILE_MEMO[path]


def read_file(path):
    """``(digest, bytes)`` of a regular file: the digest of exactly the bytes returned.

    A file not rewritten while it was read, and remembered unchanged since it
    was last hashed (see :func:`file_digest`), is not hashed again: embedding
    a path checks it (hashing it once) and then reads it again to decode it.
    """
    st, data = _read_regular(path)
    try:
        unchanged = memo_key(os.stat(path)) == memo_key(st)
    except OSError:
        unchanged = False
    if unchanged:  # not rewritten while it was read
        key, value = _recall(path)
        if key == memo_key(st):
            return value, data
    value = digest(data)
    if unchanged:
        _remember(path, st, value)
    return value, data


def file_digest(path, st):
    """The digest of the file at ``path`` whose ``os.stat`` is ``st``.

    Remembered per process under the file's device, inode, size, mtime and
    ctime, so a file is read for hashing once while it stays the same. The
    memo is never stale: any write changes the ctime (which, unlike the mtime,
    cannot be set back), a replaced file has a new inode, and a file written
    within :data:`RACY_SECONDS` of hashing is not remembered. (This relies on
    the file system keeping ctime and on the system clock not being set back.)
    """
    key, value = _recall(path)
    if key == memo_key(st):
        return value
    return read_file(path)[0]


# --------------------------------------------------------------------------
# Code identity: what a user's functions and classes compute, for cache keys

def function_code(function):
    """A function's source (found by its code's own line, so a class defined twice in one
    file gives each definition's), else its bytecode, written without memory addresses.

    The source of a lambda is its whole line(s); where they hold another
    lambda, the lines and columns of each one's instructions tell them apart.
    """
    import inspect

    code = function.__code__
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):  # no source file: exec'd code
        return _bytecode(code)
    if code.co_name != "<lambda>":
        return source
    if not hasattr(code, "co_positions"):  # Python 3.10 has no columns
        return f"{source}{_bytecode(code)}"
    return f"{source}{sorted(set(code.co_positions()), key=repr)}"


def class_code(cls):
    """The code of the functions a class defines (methods, static and class methods), by name."""
    parts = []
    for name, value in sorted(vars(cls).items()):
        function = getattr(value, "__func__", value)  # staticmethod, classmethod
        if hasattr(function, "__code__"):
            parts.append(f"{name}: {function_code(function)}")
    return "\n".join(parts)


def _bytecode(code):
    consts = tuple(_bytecode(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts)
    return repr((code.co_code, code.co_names, consts))


def source_digest(module_name):
    """The digest of the text of module ``module_name``'s Python file; None where it
    has none (built in, an extension, a notebook's or ``exec``'d code) or it cannot be read.

    The whole file: a function or method that calls a helper defined beside it
    changes what it computes when only the helper is edited.
    """
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path or not path.endswith(".py"):
        return None
    try:
        return file_digest(path, os.stat(path))
    except OSError:
        return None


# --------------------------------------------------------------------------
# Feature caches

class MemoryCache:
    """A thread-safe least-recently-used mapping bounded by the bytes it holds."""

    def __init__(self, max_bytes):
        self.max_bytes = int(max_bytes)
        self._data = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key, value):
        if value.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._data[key] = value
            self._bytes += value.nbytes
            self._evict()

    def _evict(self):
        while self._bytes > self.max_bytes:
            _, evicted = self._data.popitem(last=False)
            self._bytes -= evicted.nbytes

    def resize(self, max_bytes):
        with self._lock:
            self.max_bytes = int(max_bytes)
            self._evict()

    def clear(self):
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def info(self):
        with self._lock:
            return {"entries": len(self._data), "bytes": self._bytes, "max_bytes": self.max_bytes}


def _checked_size(max_bytes):
    """``max_bytes`` as an int, or a ValueError naming it: a whole number of bytes, 0 or more."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral) or max_bytes < 0:
        raise ValueError(f"max_bytes={max_bytes!r} must be a whole number of bytes, 0 or more "
                         "(0 keeps nothing in memory).")
    return int(max_bytes)


def _size_from_environment(default_mb=1024):
    """The bound ``SKTRANSFER_MEMORY_CACHE_MB`` sets (megabytes, fractions allowed); the
    default, told, for a value that is not a number of megabytes, 0 or more."""
    text = os.environ.get("SKTRANSFER_MEMORY_CACHE_MB")
    if text is None:
        return default_mb * 2**20
    try:
        megabytes = float(text)
        if not 0 <= megabytes < float("inf"):
            raise ValueError
    except ValueError:
        warnings.warn(f"SKTRANSFER_MEMORY_CACHE_MB={text!r} is not a number of megabytes, 0 or more; "
                      f"the memory cache keeps its default bound of {default_mb} MB.", RuntimeWarning,
                      stacklevel=2)
        return default_mb * 2**20
    return int(megabytes * 2**20)


MEMORY = MemoryCache(_size_from_environment())

_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_HEX2 = re.compile(r"[0-9a-f]{2}\Z")
_ENTRY = re.compile(r"[0-9a-f]{32}\.f32\Z")


def cache_folder(cache_dir):
    """The folder a ``cache_dir`` names, ``~`` expanded (as joblib.Memory and the shell do);
    a TypeError naming ``cache_dir`` for anything but a str or path-like name."""
    try:
        folder = os.fspath(cache_dir)
    except TypeError:
        folder = None
    if not isinstance(folder, str):
        raise TypeError(f"cache_dir={cache_dir!r} is not a folder name: use a str or path-like object "
                        "(or None for the memory cache only).")
    return os.path.expanduser(folder)


def check_cache_dir(cache_dir):
    """Refuse, with a ValueError naming ``cache_dir``, a folder name that is a file or lies
    in one: every write to the cache would fail (None, no disk cache, passes)."""
    if cache_dir is None:
        return
    folder = level = os.path.abspath(cache_folder(cache_dir))
    while not os.path.exists(level) and os.path.dirname(level) != level:
        level = os.path.dirname(level)  # the folders still to make
    if not os.path.isdir(level):
        where = "is a file" if level == folder else f"lies in the file {level!r}"
        raise ValueError(f"cache_dir={os.fspath(cache_dir)!r} {where}, not a folder: give a folder for the "
                         "feature cache (made when missing), or None to keep features in memory only.")


class DiskCache:
    """Feature vectors as files under ``root/<namespace>/<digest[:2]>/<digest>.f32``.

    Each file is the float32 vector followed by a 16-byte checksum of the
    namespace, the digest and the vector, so an entry copied under another
    key fails its check. Files are written to a temporary name and renamed
    into place, so a reader sees a whole entry or none, even beside a writer
    that is killed. Reads open only regular files (no links, no FIFOs, no
    devices) of exactly the expected size. An entry whose check fails is
    ignored and rewritten. The namespace and sub-folders are the cache's own:
    where one is a symbolic link, it is not followed (an entry there is not
    read, nor written); the ``root`` the user named may be one.

    The checksum guards against damage, not against someone who may write to
    the folder: a ``cache_dir`` must be writable only by people you trust.
    """

    SUFFIX = ".f32"

    def __init__(self, root, namespace):
        self.root = cache_folder(root)
        self.namespace = namespace
        self.folder = os.path.join(self.root, namespace)

    def _path(self, key):
        return os.path.join(self.folder, key[:2], key + self.SUFFIX)

    def _check(self, key, body):
        h = new_hasher()
        h.update(f"{self.namespace}/{key}|".encode())
        h.update(body)
        return h.digest()

    def has(self, key):
        """Whether an entry for ``key`` is on disk (whole: entries are renamed into place)."""
        try:
            with folder_below(self.root, (self.namespace, key[:2])) as (fd, folder):
                os.stat(in_folder(fd, folder, key + self.SUFFIX), dir_fd=fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    def get(self, key, num_features):
        try:
            with folder_below(self.root, (self.namespace, key[:2])) as (fd, folder):
                _, data = _read_regular(in_folder(fd, folder, key + self.SUFFIX), dir_fd=fd,
                                        size=4 * num_features + DIGEST_SIZE, follow_links=False)
        except OSError:
            return None
        body, check = data[:-DIGEST_SIZE], data[-DIGEST_SIZE:]
        if self._check(key, body) != check:
            return None
        return np.frombuffer(body, dtype=np.float32).copy()

    def put(self, key, vector):
        """Store ``vector``; return the ``OSError`` that prevented it, else None."""
        body = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        try:
            # mkstemp makes 0600; a shared cache must be readable by others
            write_atomic(self._path(key), body + self._check(key, body), mode=0o644, makedirs=True, durable=False,
                         follow_links=False, root=self.root)
        except OSError as e:
            # A full or read-only disk costs recomputation later, never a wrong entry.
            return e
        return None


def _scan(cache_dir):
    """``(entries, folders, others)`` under a disk cache folder: the files and
    folders the cache wrote, and the rest. No symbolic link is followed.

    A folder that does not exist yet holds nothing; a file in its place is
    refused (``NotADirectoryError``), as is a folder, at any level, that cannot
    be read (``PermissionError`` naming it): it is not an empty one.
    """
    entries, folders, others = [], [], []

    def listing(folder):
        try:
            return sorted(os.scandir(folder), key=lambda e: e.name)
        except FileNotFoundError:  # not created yet, or removed meanwhile by another clear_cache
            return []

    try:
        tops = listing(cache_dir)
    except NotADirectoryError:
        raise NotADirectoryError(f"cache_dir {cache_dir!r} is a file, not a folder of cached features.") from None
    for top in tops:
        if not (_HEX32.match(top.name) and top.is_dir(follow_symlinks=False)):
            others.append(top.path)
            continue
        folders.append(top.path)
        for sub in listing(top.path):
            if not (_HEX2.match(sub.name) and sub.is_dir(follow_symlinks=False)):
                others.append(sub.path)
                continue
            folders.append(sub.path)
            for entry in listing(sub.path):
                ours = _ENTRY.match(entry.name) or entry.name.startswith(_TEMP_PREFIX)
                (entries if ours and entry.is_file(follow_symlinks=False) else others).append(entry.path)
    return entries, folders, others


def _by_folder(cache_dir, paths):
    """``(fd, folder, name)`` of each of ``paths`` (found by :func:`_scan`), each folder reached
    again without following a link (see :func:`~sktransfer._outputs.folder_below`): one made
    a link since the scan, or removed, is passed over."""
    for folder, group in itertools.groupby(paths, os.path.dirname):
        names = [] if folder == cache_dir else os.path.relpath(folder, cache_dir).split(os.sep)
        try:
            with folder_below(cache_dir, names) as (fd, path):
                for entry in group:
                    yield fd, path, os.path.basename(entry)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOENT):
                raise


def cache_info(cache_dir=None):
    """Size of the feature caches.

    Parameters
    ----------
    cache_dir : str or path-like, default=None
        A disk cache folder; when None, the process-wide memory cache.

    Returns
    -------
    info : dict
        ``entries`` and ``bytes`` (and ``max_bytes`` for the memory cache).
        For a disk cache, only the entries the cache wrote are counted (none
        through a namespace or sub-folder that is a symbolic link); a folder
        not created yet has none.

    Raises
    ------
    TypeError
        When ``cache_dir`` is not a str, a path-like object or None (so does ``clear_cache``).
    NotADirectoryError
        When ``cache_dir`` is a file (so does ``clear_cache``).
    PermissionError
        When ``cache_dir`` or a folder in it cannot be read; the error names
        the folder (so does ``clear_cache``, before it deletes anything).
    """
    if cache_dir is None:
        return MEMORY.info()
    cache_dir = cache_folder(cache_dir)
    entries = _scan(cache_dir)[0]
    entries = [p for p in entries if p.endswith(DiskCache.SUFFIX)]
    size = 0
    for fd, folder, name in _by_folder(cache_dir, entries):
        try:
            size += os.stat(in_folder(fd, folder, name), dir_fd=fd, follow_symlinks=False).st_size
        except OSError:
            pass
    return {"entries": len(entries), "bytes": size}


def clear_cache(cache_dir=None):
    """Empty the process-wide memory cache, or delete a disk cache folder's entries.

    Parameters
    ----------
    cache_dir : str or path-like, default=None
        A disk cache folder to empty; when None, the memory cache is cleared.
        Only what the cache wrote there is deleted (``<namespace>/<xx>/<digest>.f32``
        entries, unfinished ``.tmp-*`` writes, and the folders they leave
        empty). Anything else is left in place, and one ``UserWarning`` lists it.
        A namespace or sub-folder that is a symbolic link is not followed: the
        link is left in place, and listed (``cache_dir`` itself may be one).
    """
    if cache_dir is None:
        MEMORY.clear()
        return
    cache_dir = cache_folder(cache_dir)
    entries, folders, others = _scan(cache_dir)
    for fd, folder, name in _by_folder(cache_dir, entries):
        try:
            os.unlink(in_folder(fd, folder, name), dir_fd=fd)
        except FileNotFoundError:
            pass
    for fd, parent, name in _by_folder(cache_dir, reversed(folders)):  # sub-folders before their namespace
        try:
            os.rmdir(in_folder(fd, parent, name), dir_fd=fd)  # only when empty: what else sits there stays
        except OSError:
            pass
    if others:
        shown = ", ".join(repr(p) for p in others[:10])
        more = f" and {len(others) - 10} more" if len(others) > 10 else ""
        warnings.warn(
            f"clear_cache({cache_dir!r}) left {len(others)} path(s) that the feature cache did not "
            f"write in place: {shown}{more}. Delete them yourself if they are not needed.",
            UserWarning, stacklevel=2,
        )


def set_memory_cache_size(max_bytes):
    """Bound the process-wide memory cache to ``max_bytes`` (default 1 GiB,
    or ``SKTRANSFER_MEMORY_CACHE_MB`` from the environment); 0 keeps nothing."""
    MEMORY.resize(_checked_size(max_bytes))
