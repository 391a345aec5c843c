"""Stage 4: image items to feature vectors, each image through the backbone once.

Features are cached under ``(backbone fingerprint, image content digest)``:
in a process-wide memory cache bounded in bytes, shared by every estimator
and every clone a grid search makes, and optionally in a disk cache
(``cache_dir``) shared by processes, sessions and machines.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from ._images import header_error, load_pixels, open_image
from ._inputs import ImageInputError, read_item
from ._runtime import steady_heap

__all__ = ["clear_cache", "cache_info", "set_memory_cache_size"]


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

    def resize(self, max_bytes):
        with self._lock:
            self.max_bytes = int(max_bytes)
            self._evict()

    def _evict(self):
        """Drop least recently used entries down to the bound; the caller holds the lock."""
        while self._bytes > self.max_bytes:
            _, evicted = self._data.popitem(last=False)
            self._bytes -= evicted.nbytes

    def clear(self):
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def info(self):
        with self._lock:
            return {"entries": len(self._data), "bytes": self._bytes, "max_bytes": self.max_bytes}


_MEMORY = MemoryCache(int(os.environ.get("SKTRANSFER_MEMORY_CACHE_MB", "1024")) * 2**20)


class DiskCache:
    """Feature vectors as files under ``root/<fingerprint>/<digest[:2]>/<digest>.f32``.

    Each file is the float32 vector followed by a 16-byte digest of it. Files
    are written to a temporary name and renamed into place, so a reader sees
    a whole entry or none, even beside a writer that is killed; an entry
    whose check fails (a damaged disk, a truncated copy) is ignored and
    rewritten.
    """

    SUFFIX = ".f32"

    def __init__(self, root, fingerprint):
        self.root = os.fspath(root)
        self.folder = os.path.join(self.root, fingerprint)

    def _path(self, digest):
        return os.path.join(self.folder, digest[:2], digest + self.SUFFIX)

    def get(self, digest, num_features):
        try:
            with open(self._path(digest), "rb") as f:
                data = f.read()
        except OSError:
            return None
        body, check = data[:-16], data[-16:]
        if len(body) != 4 * num_features or hashlib.blake2b(body, digest_size=16).digest() != check:
            return None
        return np.frombuffer(body, dtype=np.float32).copy()

    def put(self, digest, vector):
        body = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        path = self._path(digest)
        folder = os.path.dirname(path)
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            if hasattr(os, "fchmod"):  # mkstemp makes 0600; a shared cache must be readable by others
                os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(body + hashlib.blake2b(body, digest_size=16).digest())
            os.replace(tmp, path)
        except OSError as e:
            # A full or read-only disk costs recomputation later, never a wrong entry.
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return e
        return None


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
    """
    if cache_dir is None:
        return _MEMORY.info()
    entries, size = 0, 0
    for folder, _, files in os.walk(os.fspath(cache_dir)):
        for name in files:
            if name.endswith(DiskCache.SUFFIX):
                entries += 1
                size += os.path.getsize(os.path.join(folder, name))
    return {"entries": entries, "bytes": size}


def clear_cache(cache_dir=None):
    """Empty the process-wide memory cache, or delete a disk cache folder's entries.

    Parameters
    ----------
    cache_dir : str or path-like, default=None
        A disk cache folder to empty; when None, the memory cache is cleared.
    """
    if cache_dir is None:
        _MEMORY.clear()
        return
    cache_dir = os.fspath(cache_dir)
    if os.path.isdir(cache_dir):
        for entry in os.listdir(cache_dir):
            path = os.path.join(cache_dir, entry)
            if os.path.isdir(path) and len(entry) == 32:  # a fingerprint folder
                shutil.rmtree(path, ignore_errors=True)


def set_memory_cache_size(max_bytes):
    """Bound the process-wide memory cache to ``max_bytes`` (default 1 GiB,
    or ``SKTRANSFER_MEMORY_CACHE_MB`` from the environment)."""
    _MEMORY.resize(max_bytes)


def _reason(error):
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, IsADirectoryError):
        return "is a folder, not an image file"
    text = str(error.args[0]) if getattr(error, "args", None) else str(error)
    return text or type(error).__name__


# With the steady heap, torch.compile added about a sixth to EfficientNet-Lite0's
# CPU throughput here (127 -> 146-155 img/s, 500x375 photos), about 1.2 ms per
# image, for 23 s of compilation with an empty inductor cache (3.7 s with a
# warm one). "auto" compiles only when one call embeds enough new images to
# repay a cold compilation.
COMPILE_MIN_IMAGES = 20000


def extract_features(items, backbone, *, batch_size=8, cache_dir=None, device="cpu",
                     name="X", progress=False, compile="auto", view=None, engine="auto",
                     precision="auto"):
    """Features of every item, computing only those no cache holds.

    Every input is checked before the backbone runs (readable, an image
    Pillow identifies); when any fails, the others are decoded too (no
    backbone) so one :class:`ImageInputError` lists every bad input. Images
    that pass those checks but fail to decode during the pass are collected,
    and one :class:`ImageInputError` lists them all at the end of the pass.

    ``view`` (a :class:`sktransfer._augment.View`) transforms each decoded
    image before preprocessing; its features are cached under the view's
    identity beside the plain image's.

    ``engine`` and ``precision`` choose where the body runs
    (:meth:`sktransfer._backbones.Backbone.plan`); features of each plan are
    cached apart.

    Returns
    -------
    features : ndarray of shape (len(items), backbone.num_features), float32
    """
    plan = backbone.plan(device, engine, precision, compile, n_images=len(items))
    fingerprint = plan.namespace(view_fingerprint(backbone.fingerprint, view))
    disk = DiskCache(cache_dir, fingerprint) if cache_dir is not None else None
    out = np.empty((len(items), backbone.num_features), dtype=np.float32)
    errors = []
    todo = collections.OrderedDict()  # digest -> (payload, [indices])
    for i, item in enumerate(items):
        try:
            digest, payload = read_item(item)
        except (OSError, ValueError, TypeError) as e:
            errors.append((i, item, _reason(e)))
            continue
        if digest in todo:
            todo[digest][1].append(i)
            continue
        vector = _MEMORY.get((fingerprint, digest))
        if vector is None and disk is not None:
            vector = disk.get(digest, backbone.num_features)
            if vector is not None:
                _MEMORY.put((fingerprint, digest), vector)
        if vector is not None:
            out[i] = vector
            continue
        reason = header_error(payload)
        if reason:
            errors.append((i, item, reason))
            continue
        todo[digest] = (payload, [i])
    if errors:
        # Some inputs are unusable, so nothing will be embedded: decode the rest
        # (at reduced scale, no backbone) so one error lists every bad input.
        errors += _decode_errors(todo, items)
        raise ImageInputError(sorted(errors, key=lambda e: e[0]), name=name)
    if todo:
        use_compile = plan.engine == "torch" and (
            compile is True or (compile == "auto" and len(todo) >= COMPILE_MIN_IMAGES))
        runner = backbone.runner(plan, device, use_compile, batch_size)
        # One batch gains nothing from a steady heap, and trimming after it would
        # make the next small call (predicting one image) fault its pages in again.
        heap = steady_heap() if len(todo) > batch_size else contextlib.nullcontext()
        with heap:
            errors = _run_backbone(todo, items, backbone.preprocessing, runner, out, batch_size, disk,
                                   progress, view, fingerprint)
        if errors:
            raise ImageInputError(sorted(errors, key=lambda e: e[0]), name=name)
    return out


def _decode_errors(todo, items):
    """``(index, item, reason)`` of each pending item that fails to decode."""

    def check(payload):
        try:
            open_image(payload, min_size=1)  # JPEGs decode at 1/8 scale: cheap, still complete
        except (OSError, ValueError) as e:
            return _reason(e)
        return None

    entries = list(todo.values())
    with ThreadPoolExecutor(max_workers=max(1, min(4, torch.get_num_threads()))) as pool:
        reasons = list(pool.map(check, [payload for payload, _ in entries]))
    return [(i, items[i], reason) for (_, indices), reason in zip(entries, reasons) if reason
            for i in indices]


def view_fingerprint(fingerprint, view):
    """The cache namespace of a view's features: the backbone's own without a view."""
    if view is None:
        return fingerprint
    return hashlib.blake2b(f"{fingerprint}|view|{view.key}".encode(), digest_size=16).hexdigest()


def _run_backbone(todo, items, preprocessing, runner, out, batch_size, disk, progress, view, fingerprint):
    def load(payload, digest):
        try:
            return load_pixels(payload, preprocessing, view, digest), None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return None, _reason(e)

    entries = list(todo.items())
    batches = [entries[k:k + batch_size] for k in range(0, len(entries), batch_size)]
    errors = []
    write_error = None
    bar = _progress_bar(len(entries), progress)
    # Decoding runs in a small thread pool (Pillow releases the GIL) one batch
    # ahead of the forward pass, so at most two batches of pixels are held. It
    # takes as many threads as torch may use: joblib and dask workers cap
    # torch at their share of the cores, and decoding keeps to it too.
    with ThreadPoolExecutor(max_workers=max(1, min(4, torch.get_num_threads()))) as pool:
        pending = [pool.submit(load, p, d) for d, (p, _) in batches[0]] if batches else []
        for b, batch in enumerate(batches):
            results = [f.result() for f in pending]
            if b + 1 < len(batches):
                pending = [pool.submit(load, p, d) for d, (p, _) in batches[b + 1]]
            arrays, kept = [], []
            for (digest, (_, indices)), (array, reason) in zip(batch, results):
                if array is None:
                    errors.extend((i, items[i], reason) for i in indices)
                else:
                    arrays.append(array)
                    kept.append((digest, indices))
            if arrays:
                features = runner(arrays)
                for (digest, indices), vector in zip(kept, features):
                    vector = vector.copy()
                    _MEMORY.put((fingerprint, digest), vector)
                    if disk is not None and write_error is None:
                        write_error = disk.put(digest, vector)
                    out[indices] = vector
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    if write_error is not None:
        warnings.warn(
            f"Could not write to the feature cache cache_dir={disk.root!r} ({write_error}); "
            "the features are computed and returned, but not cached on disk.",
            RuntimeWarning, stacklevel=4,
        )
    return errors


def _progress_bar(total, progress):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="embedding images", unit="img")
