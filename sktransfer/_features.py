"""Stage 4: image items to feature vectors, each image through the backbone once.

Features are cached under ``(backbone fingerprint, image content digest)``:
in a process-wide memory cache bounded in bytes, shared by every estimator
and every clone a grid search makes, and optionally in a disk cache
(``cache_dir``) shared by processes, sessions and machines.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from . import _engine
from ._augment import TransformError
from ._cache import MEMORY, DiskCache, read_file, view_fingerprint
from ._engine import TORCH_FLOAT32
from ._images import header_error, load_pixels, open_image
from ._inputs import ImageInputError, _describe, error_reason, read_item
from ._runtime import steady_heap


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
    base = view_fingerprint(backbone.fingerprint, view)
    in_torch = TORCH_FLOAT32.namespace(base)
    found, n_images = None, len(items)
    if engine != "torch" and torch.device(device).type == "cpu" and not backbone.converted():
        # The plan may convert the body: unusable inputs are told before that. And a
        # conversion is repaid by the images still to embed, not by those PyTorch
        # embedded before, whose features are cached.
        found = _look_up(items, in_torch, cache_dir, backbone.num_features)
        _raise_unusable(found, items, name)
        n_images = len(found[1])
    plan = backbone.plan(device, engine, precision, compile, n_images=n_images)
    fingerprint = plan.namespace(base, device)
    if found is None or fingerprint != in_torch:
        found = _look_up(items, fingerprint, cache_dir, backbone.num_features)
        _raise_unusable(found, items, name)
    out, todo, errors, disk = found
    if todo:
        use_compile = plan.engine == "torch" and (
            compile is True or (compile == "auto" and len(todo) >= COMPILE_MIN_IMAGES))
        runner = backbone.runner(plan, device, use_compile, batch_size)
        # One batch gains nothing from a steady heap, and trimming after it would
        # make the next small call (predicting one image) fault its pages in again.
        heap = steady_heap() if len(todo) > batch_size else contextlib.nullcontext()
        with heap:
            errors = _run_backbone(todo, items, backbone.preprocessing, runner, out, batch_size, disk,
                                   progress, view, fingerprint, name, decode_workers(device))
        if errors:
            raise ImageInputError(sorted(errors, key=lambda e: e[0]), name=name)
    return out


def _look_up(items, fingerprint, cache_dir, num_features):
    """``(out, todo, errors, disk)``: the features of ``items`` the caches hold under
    ``fingerprint`` (rows of ``out``), the distinct items still to embed (digest ->
    (payload, indices)), the items that cannot be read or identified as images
    (index, item, reason), and the disk cache (or None)."""
    disk = DiskCache(cache_dir, fingerprint) if cache_dir is not None else None
    out = np.empty((len(items), num_features), dtype=np.float32)
    errors = []
    todo = collections.OrderedDict()
    write_error = None
    for i, item in enumerate(items):
        try:
            digest, payload = read_item(item)
        except (OSError, ValueError, TypeError) as e:
            errors.append((i, item, error_reason(e)))
            continue
        if digest in todo:
            todo[digest][1].append(i)
            continue
        vector = MEMORY.get((fingerprint, digest))
        if vector is not None and disk is not None and write_error is None and not disk.has(digest):
            # Computed before cache_dir was given (or after it was cleared): the disk gets it now.
            write_error = disk.put(digest, vector)
        if vector is None and disk is not None:
            vector = disk.get(digest, num_features)
            if vector is not None:
                MEMORY.put((fingerprint, digest), vector)
        if vector is not None:
            out[i] = vector
            continue
        reason = header_error(payload)
        if reason:
            errors.append((i, item, reason))
            continue
        todo[digest] = (payload, [i])
    _warn_unwritten(disk, write_error)
    return out, todo, errors, disk


def _raise_unusable(found, items, name):
    """Raise one :class:`ImageInputError` listing every unusable input when a look-up
    (``found``) met any: the items still to embed are then decoded too (at reduced
    scale, no backbone), since nothing will be embedded."""
    _, todo, errors, _ = found
    if errors:
        raise ImageInputError(sorted(errors + _decode_errors(todo, items), key=lambda e: e[0]), name=name)


def _decode_errors(todo, items):
    """``(index, item, reason)`` of each pending item that fails to decode."""

    def check(payload):
        try:
            open_image(payload, min_size=1)  # JPEGs decode at 1/8 scale: cheap, still complete
        except (OSError, ValueError) as e:
            return error_reason(e)
        return None

    entries = list(todo.values())
    with ThreadPoolExecutor(max_workers=decode_workers("cpu")) as pool:
        reasons = list(pool.map(check, [payload for payload, _ in entries]))
    return [(i, items[i], reason) for (_, indices), reason in zip(entries, reasons) if reason
            for i in indices]


def decode_workers(device):
    """Threads that decode images while the backbone runs on ``device``.

    As many as torch may use (joblib and dask workers cap torch at their share
    of the cores, and decoding keeps to it too). On the CPU at most 4, since
    the engine computes on the same cores; a GPU leaves them all to decoding.
    """
    threads = torch.get_num_threads()
    return max(1, threads if torch.device(device).type != "cpu" else min(4, threads))


def _run_backbone(todo, items, preprocessing, runner, out, batch_size, disk, progress, view, fingerprint, name,
                  workers):
    def load(payload, digest, indices):
        try:
            if isinstance(payload, str):
                # Hash the bytes that are decoded: the features are cached under the
                # digest of what was read now, even if the file changed since it was checked.
                digest, payload = read_file(payload)
            return digest, load_pixels(payload, preprocessing, view, digest), None
        except TransformError as e:  # the user's transform failed, not the image: told at once
            raise e.located(f"{name}[{indices[0]}] ({_describe(items[indices[0]])})") from e.error
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return digest, None, error_reason(e)

    entries = list(todo.items())
    batches = [entries[k:k + batch_size] for k in range(0, len(entries), batch_size)]
    errors = []
    write_error = None
    bar = _progress_bar(len(entries), progress)
    # Decoding runs in a thread pool of ``workers`` (Pillow releases the GIL)
    # one batch ahead of the forward pass, so at most two batches of pixels are
    # held. One image (predicting one photo) decodes in this thread: a pool
    # would only add the start of its threads to the call.
    with contextlib.ExitStack() as stack:
        submit = _run_now
        if len(entries) > 1:
            submit = stack.enter_context(ThreadPoolExecutor(max_workers=workers)).submit
        pending = [submit(load, p, d, i) for d, (p, i) in batches[0]] if batches else []
        for b, batch in enumerate(batches):
            results = [f.result() for f in pending]
            if b + 1 < len(batches):
                pending = [submit(load, p, d, i) for d, (p, i) in batches[b + 1]]
            arrays, kept = [], []
            for (_, (_, indices)), (digest, array, reason) in zip(batch, results):
                if array is None:
                    errors.extend((i, items[i], reason) for i in indices)
                else:
                    arrays.append(array)
                    kept.append((digest, indices))
            if arrays:
                features = runner(arrays)
                for (digest, indices), vector in zip(kept, features):
                    vector = vector.copy()
                    MEMORY.put((fingerprint, digest), vector)
                    if disk is not None and write_error is None:
                        write_error = disk.put(digest, vector)
                    out[indices] = vector
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    _warn_unwritten(disk, write_error)
    return errors


def _warn_unwritten(disk, error):
    """Tell of the ``OSError`` that kept features off the disk cache, if any."""
    if error is not None:
        warnings.warn(
            f"Could not write to the feature cache cache_dir={disk.root!r} ({error}); "
            "the features are computed and returned, but not cached on disk.",
            RuntimeWarning, stacklevel=5,  # the user's fit or transform
        )


def _run_now(fn, *args):
    """``fn(*args)`` run in this thread, as a finished :class:`~concurrent.futures.Future`."""
    future = Future()
    future.set_result(fn(*args))
    return future


def _progress_bar(total, progress):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="embedding images", unit="img")
