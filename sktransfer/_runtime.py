"""Process-wide side effects, in one place: the heap, thread counts, random generators.

Everything here changes state that the whole process shares (glibc's
malloc settings, OpenMP and torch thread counts, torch's, NumPy's and Python's
global random generators). Each is a context manager that restores what it changed,
and each is safe to nest and to use from several threads at once:

- :func:`steady_heap` is shared: the first user applies the setting, the
  last one to leave restores it.
- :func:`limited_threads` changes only the calling thread's thread pool
  size, so other threads keep theirs.
- :func:`one_blas_thread` runs one block at a time per process: BLAS's
  thread count is process-wide.
- :func:`seeded_rng` runs one block at a time per process, since the
  generators it seeds are global.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import random
import sys
import threading

import numpy as np
import torch

# -- the heap ---------------------------------------------------------------------

# glibc returns freed memory at the top of the heap to the kernel, and serves
# allocations above a (growing) threshold with fresh mmaps. Both hit a CNN's
# activations on every forward pass: each batch allocates and frees tens of
# megabytes, and the kernel zeroes every page again. On the 2-core machine in
# docs/benchmarks.md that page-fault work took about half of a pass. During a
# pass the thresholds are raised so freed activations stay in the heap for the
# next batch; afterwards they are set to glibc's own ceilings for its adaptive
# values (32 MiB and 64 MiB) and the heap is trimmed, giving the memory back.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_STATE = {"users": 0, "libc": None}
_HEAP_LOCK = threading.Lock()
#: Environment variables by which users tune glibc's malloc themselves.
_USER_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def _tunable_libc():
    """glibc's ``mallopt``/``malloc_trim``, or None where the heap is not tuned."""
    if os.environ.get("SKTRANSFER_TUNE_HEAP", "1") == "0":
        return None
    if any(name in os.environ for name in _USER_MALLOC_SETTINGS):
        return None  # the user's own malloc settings stay in charge
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    if _HEAP_STATE["libc"] is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
        except (OSError, AttributeError):
            return None
        _HEAP_STATE["libc"] = libc
    return _HEAP_STATE["libc"]


@contextlib.contextmanager
def steady_heap():
    """Keep activation buffers in the heap for the duration of backbone passes.

    Nested and concurrent passes share one setting; the last one to finish
    restores glibc's ceilings and trims. A no-op off glibc, when
    ``SKTRANSFER_TUNE_HEAP=0``, or when the user sets malloc's thresholds
    through the environment.
    """
    libc = _tunable_libc()
    if libc is None:
        yield
        return
    with _HEAP_LOCK:
        _HEAP_STATE["users"] += 1
        if _HEAP_STATE["users"] == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
            libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        with _HEAP_LOCK:
            _HEAP_STATE["users"] -= 1
            if _HEAP_STATE["users"] == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
                libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
                libc.malloc_trim(0)


# -- thread counts ----------------------------------------------------------------

_POOLS = {}
_BLAS_LOCK = threading.RLock()


def _pools(user_api):
    """threadpoolctl's handle on the ``"openmp"`` runtimes (torch's among them) or the
    ``"blas"`` libraries (numpy's) loaded in this process."""
    if user_api not in _POOLS:  # scanning the loaded libraries costs milliseconds: once
        from threadpoolctl import ThreadpoolController

        _POOLS[user_api] = ThreadpoolController().select(user_api=user_api)
    return _POOLS[user_api]


@contextlib.contextmanager
def one_blas_thread():
    """Run numpy's BLAS on one thread for the duration.

    For the head's tuning in closed form (scikit-learn's ``RidgeCV``) on no
    more rows than features: its products gain little from more threads, and
    on a busy machine idle BLAS threads spin (on the 2-core machine of
    docs/benchmarks.md at load average 4, ``RidgeCV`` on 420 rows took 3.5 s
    on two OpenBLAS threads and 0.07 s on one). BLAS's thread count is
    process-wide, and threadpoolctl lets only the thread that set a limit
    on OpenBLAS lift it, so the blocks of concurrent threads run one at a
    time, each setting and restoring the count itself.
    """
    with _BLAS_LOCK, _pools("blas").limit(limits=1):
        yield


@contextlib.contextmanager
def limited_threads(n_threads=1, enabled=True):
    """Run torch's CPU work in the calling thread on at most ``n_threads`` threads.

    For the head: its small matrix products only lose from more threads, and
    on a busy machine idle OpenMP threads spin and slow it tenfold. Only the
    calling thread's counts change, so a backbone pass in another thread,
    and any thread started meanwhile, keeps the process's count.

    Two per-thread settings make torch's count: OpenMP's (torch's intra-op
    pool), limited through threadpoolctl, and that of the MKL torch links
    statically (invisible to threadpoolctl), which keeps a count of its own
    in a thread once ``torch.set_num_threads`` has run there; it is limited
    through MKL's per-thread setter (:func:`_mkl_local_setter`).
    ``torch.set_num_threads`` itself is not called: it also sets the count
    that every thread copies on its first torch call, which would leave a
    thread started during the block on ``n_threads`` for good. torch's lazy
    per-thread set-up runs before the limit, so it cannot reset it inside.
    numpy's BLAS, whose thread count is process-wide, is left alone here;
    the head's closed-form tuning limits it with :func:`one_blas_thread`.
    """
    if not enabled:
        yield
        return
    torch.get_num_threads()  # torch's per-thread set-up, before the limit
    mkl = _mkl_local_setter()
    with _pools("openmp").limit(limits=n_threads):
        previous = mkl(n_threads) if mkl is not None else None
        try:
            yield
        finally:
            if mkl is not None:
                mkl(previous)  # 0: the thread follows MKL's global count again


@functools.lru_cache(maxsize=1)
def _mkl_local_setter():
    """``MKL_Set_Num_Threads_Local`` (the C function of MKL's ``mkl_service.h``) of the
    MKL linked into torch, or None where torch has none. It sets the calling
    thread's count and returns the previous one (0: none, the global count)."""
    if not torch.backends.mkl.is_available():
        return None
    folder = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        try:
            setter = ctypes.CDLL(os.path.join(folder, name)).MKL_Set_Num_Threads_Local
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
        return setter
    return None


# -- random generators --------------------------------------------------------------

# One lock for every block that seeds or draws from torch's (and NumPy's and
# Python's) global generators: two such blocks in two threads would draw from, and
# reseed, each other's stream. Re-entrant, so seeded blocks may nest.
_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded_rng(seed, device="cpu"):
    """Run the block with torch's, NumPy's and Python's global generators seeded from ``seed``.

    Augmentations draw from any of them: torchvision from torch's and
    Python's, albumentations and imgaug from NumPy's. The generators are
    restored afterwards (``torch.random.fork_rng``, and the CUDA generator of
    ``device`` when it is a GPU). Blocks run one at a time
    per process, so equal seeds give equal draws even when estimators are
    fitted in several threads at once. ``seed=None`` takes the lock without
    seeding: an unseeded fit still does not draw from a seeded block's
    stream.

    Parameters
    ----------
    seed : int or None
        The seed of every generator (an integer of up to 64 bits).
    device : str or torch.device, default="cpu"
        Also forks and seeds this device's generator when it is a GPU.
    """
    with _RNG_LOCK:
        if seed is None:
            yield
            return
        devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            state, numpy_state = random.getstate(), np.random.get_state()
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF])  # NumPy's takes 32-bit words
            try:
                yield
            finally:
                random.setstate(state)
                np.random.set_state(numpy_state)
