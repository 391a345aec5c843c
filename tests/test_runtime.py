"""Process-wide side effects: the heap setting, thread counts, seeded random generators."""

import json
import os
import platform
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sktransfer._runtime import limited_threads, one_blas_thread, seeded_rng

ROOT = Path(__file__).resolve().parents[1]
GLIBC = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                           reason="the heap is tuned only where glibc's malloc runs")


# -- the heap during backbone passes ------------------------------------------

_PASS_FAULTS = r'''
import json, resource, sys
import numpy as np
from sktransfer import clear_cache
from sktransfer._backbones import build_backbone
from sktransfer._features import extract_features
paths = json.loads(sys.argv[1])
backbone = build_backbone("efficientnet_lite0")
extract_features(paths[:8], backbone)  # the first batch builds what every later one reuses
clear_cache()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
features = extract_features(paths, backbone)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
np.save(sys.argv[2], features)
print(faults)
'''


@GLIBC
def test_backbone_passes_reuse_the_heap_instead_of_faulting_in_new_pages(sample, tmp_path):
    # glibc would hand each batch's freed activations back to the kernel and
    # fault them in again for the next batch; during a pass they stay in the
    # heap. Counted in minor page faults (not time), in fresh processes.
    paths = json.dumps(sample[0][:48])
    faults = {}
    for tune in ("1", "0"):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
        env.update(SKTRANSFER_TUNE_HEAP=tune, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", _PASS_FAULTS, paths, str(tmp_path / f"{tune}.npy")],
                             capture_output=True, text=True, env=env, check=True)
        faults[tune] = int(out.stdout.split()[-1])
    assert faults["1"] * 3 < faults["0"], faults
    np.testing.assert_array_equal(np.load(tmp_path / "1.npy"), np.load(tmp_path / "0.npy"))


def test_users_own_malloc_settings_are_left_alone(monkeypatch):
    from sktransfer import _runtime

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert _runtime._tunable_libc() is None
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("SKTRANSFER_TUNE_HEAP", "0")
    assert _runtime._tunable_libc() is None
    with _runtime.steady_heap():  # a plain no-op then
        assert _runtime._HEAP_STATE["users"] == 0


@GLIBC
def test_nested_passes_share_one_heap_setting(monkeypatch):
    from sktransfer import _runtime

    for name in ("SKTRANSFER_TUNE_HEAP", *_runtime._USER_MALLOC_SETTINGS):
        monkeypatch.delenv(name, raising=False)
    with _runtime.steady_heap():
        with _runtime.steady_heap():
            assert _runtime._HEAP_STATE["users"] == 2
        assert _runtime._HEAP_STATE["users"] == 1  # the outer pass keeps the setting
    assert _runtime._HEAP_STATE["users"] == 0


# -- thread counts ------------------------------------------------------------------

def _in_thread(fn):
    """``fn()`` run in a new thread; its result, or the exception it raised."""
    out = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0]


def test_limited_threads_limits_torch_and_restores_the_count():
    before = torch.get_num_threads()
    with limited_threads():
        assert torch.get_num_threads() == 1
        with limited_threads():  # nested: still one, and the outer limit survives the inner exit
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with limited_threads(enabled=False):
        assert torch.get_num_threads() == before


def test_limited_threads_limits_openmp_as_threadpoolctl_sees_it():
    from threadpoolctl import threadpool_info

    def openmp_counts():
        return {pool["filepath"]: pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "openmp"}

    torch.get_num_threads()  # torch's own per-thread set-up, which would change the count inside
    before = openmp_counts()
    if not before:
        pytest.skip("no OpenMP runtime loaded (torch built without OpenMP)")
    with limited_threads():
        assert set(openmp_counts().values()) == {1}
    assert openmp_counts() == before


def test_a_limit_in_one_thread_leaves_other_threads_alone():
    # A backbone pass in another thread keeps its threads while a head predicts here.
    full = _in_thread(torch.get_num_threads)
    inside, limited = threading.Event(), threading.Event()
    seen = []

    def head():
        with limited_threads():
            seen.append(torch.get_num_threads())
            limited.set()
            inside.wait(10)
        seen.append(torch.get_num_threads())

    worker = threading.Thread(target=head)
    worker.start()
    limited.wait(10)
    try:
        assert torch.get_num_threads() == full  # this thread, during the other's limit
    finally:
        inside.set()
        worker.join()
    assert seen == [1, full]


def test_a_thread_started_during_a_limit_gets_the_process_count():
    # torch's setter also sets the count that a thread's first torch call copies: a thread
    # started while another fits a head must not be left on one thread for good.
    full = _in_thread(torch.get_num_threads)
    inside, release = threading.Event(), threading.Event()

    def head():
        with limited_threads():
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=head)
    worker.start()
    inside.wait(10)
    try:
        during = _in_thread(lambda: (torch.get_num_threads(), _mkl_threads()))
    finally:
        release.set()
        worker.join()
    assert during[0] == full and during[1] in (full, None)


def test_one_blas_thread_limits_blas_in_any_thread_one_block_at_a_time():
    # threadpoolctl lets only the thread that limited OpenBLAS lift the limit: blocks in
    # different threads must each set and restore it, so they run one after the other.
    from threadpoolctl import threadpool_info

    def blas_counts():
        return {pool["filepath"]: pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    before = blas_counts()
    if not before:
        pytest.skip("no BLAS loaded by numpy")
    events, inside = [], threading.Event()

    def other():  # tries to enter while this thread is inside
        inside.wait(10)
        with one_blas_thread():
            events.append(("other in", set(blas_counts().values())))
        events.append(("other out", blas_counts() == before))

    worker = threading.Thread(target=other)
    worker.start()
    with one_blas_thread():
        inside.set()
        time.sleep(0.2)  # the other thread is waiting to enter now
        events.append(("main in", set(blas_counts().values())))
    worker.join()
    assert events == [("main in", {1}), ("other in", {1}), ("other out", True)]
    assert blas_counts() == before
    with one_blas_thread():
        with one_blas_thread():  # nested in one thread
            assert set(blas_counts().values()) == {1}
    assert blas_counts() == before


def _mkl_threads():
    """The thread count of the MKL linked into torch (None without one), as torch reports it."""
    match = re.search(r"mkl_get_max_threads\(\) : (\d+)", torch.__config__.parallel_info())
    return int(match.group(1)) if match else None


def test_the_limit_holds_after_the_user_sets_torch_threads():
    # threadpoolctl alone misses this case: after torch.set_num_threads, the MKL
    # that torch links statically keeps its own count, which threadpoolctl cannot see.
    original = torch.get_num_threads()

    def run():
        torch.set_num_threads(2)
        try:
            with limited_threads():
                inside = torch.get_num_threads(), _mkl_threads()
            return inside, torch.get_num_threads()
        finally:
            torch.set_num_threads(original)  # the count new threads start with is process-wide

    (threads, mkl), after = _in_thread(run)
    assert threads == 1 and mkl in (1, None) and after == 2


# -- random generators ----------------------------------------------------------------

def test_seeded_rng_gives_equal_draws_and_restores_the_generators():
    torch.manual_seed(123)
    random.seed(123)
    expected_torch, expected_py = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    with seeded_rng(7):
        first = torch.rand(3), random.random()
    with seeded_rng(7):
        second = torch.rand(3), random.random()
    assert torch.equal(first[0], second[0]) and first[1] == second[1]
    # The streams outside continue as if the seeded blocks had not run.
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_py


def test_seeded_blocks_in_threads_do_not_disturb_each_other():
    # Two seeded draws running at once in threads: each gets its own seed's stream.
    with seeded_rng(1):
        alone_1 = torch.rand(1000)
    with seeded_rng(2):
        alone_2 = torch.rand(1000)
    start = threading.Barrier(2)
    results = {}

    def draw(seed):
        start.wait(10)
        with seeded_rng(seed):
            draws = []
            for _ in range(10):
                draws.append(torch.rand(100))
                time.sleep(0.001)  # hand over to the other thread between draws
            results[seed] = torch.cat(draws)

    workers = [threading.Thread(target=draw, args=(seed,)) for seed in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert torch.equal(results[1], alone_1) and torch.equal(results[2], alone_2)


def test_seeded_blocks_nest():
    with seeded_rng(3):
        with seeded_rng(4):
            inner = torch.rand(2)
        after_inner = torch.rand(2)
    with seeded_rng(3):
        expected = torch.rand(2)
    with seeded_rng(4):
        assert torch.equal(torch.rand(2), inner)
    assert torch.equal(after_inner, expected)  # the outer stream resumed where it was


def test_seeded_rng_seeds_and_restores_numpys_global_generator():
    # Augmentations from albumentations, imgaug or one's own draw from np.random.
    np.random.seed(123)
    expected = np.random.rand(3)
    np.random.seed(123)
    with seeded_rng(7):
        first = np.random.rand(3)
    with seeded_rng(7):
        second = np.random.rand(3)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(np.random.rand(3), expected)  # the outer stream is untouched
