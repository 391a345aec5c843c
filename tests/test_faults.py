"""Faults: interrupted fits, killed cache writers, full disks, incompatible pickles."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted
from skorch.callbacks import Callback

import sktransfer
from sktransfer import ImageEmbedder, PretrainedImageClassifier, cache_info
from sktransfer._cache import DiskCache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small(sample):
    paths, labels = sample
    keep = list(range(4)) + list(range(30, 34))
    return [paths[i] for i in keep], labels[keep]


def _run(code, *args, **kwargs):
    """Run ``code`` in a fresh Python process with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          env=env, capture_output=True, text=True, **kwargs)


class InterruptAt(Callback):
    """Raises KeyboardInterrupt at the end of epoch ``epoch``, as Ctrl-C would."""

    def __init__(self, epoch=2):
        self.epoch = epoch

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == self.epoch:
            raise KeyboardInterrupt


def test_interrupted_fit_leaves_no_half_fitted_model(small):
    X, y = small
    clf = PretrainedImageClassifier(max_epochs=6, random_state=0, callbacks=[InterruptAt(2)])
    with pytest.raises(KeyboardInterrupt):
        clf.fit(X, y)
    with pytest.raises(NotFittedError):
        check_is_fitted(clf)
    assert not hasattr(clf, "classes_") and not hasattr(clf, "embedder_")

    clf.set_params(callbacks=None).fit(X, y)  # a later fit works
    before, epochs = clf.predict_proba(X), len(clf.history_)
    assert epochs >= 2

    clf.set_params(callbacks=[InterruptAt(1)], weight_decay=0.5)
    with pytest.raises(KeyboardInterrupt):
        clf.fit(X, y)
    np.testing.assert_array_equal(clf.predict_proba(X), before)  # the previous model, untouched
    assert len(clf.history_) == epochs


def test_early_stopping_is_a_normal_end_not_an_interrupt(sample):
    paths, labels = sample
    keep = list(range(10)) + list(range(30, 40))
    clf = PretrainedImageClassifier(early_stopping=True, validation_fraction=0.2, n_iter_no_change=1,
                                    max_epochs=300, random_state=0)
    clf.fit([paths[i] for i in keep], labels[keep])
    assert len(clf.history_) < 300 and clf.predict(paths[:2]).shape == (2,)


WRITER = """
import sys, numpy as np
from sktransfer._cache import DiskCache
cache = DiskCache(sys.argv[1], "f" * 32)
base = np.arange(int(sys.argv[2]), dtype=np.float32)
i = 0
while True:
    cache.put(f"{i:032x}", base + i)
    i += 1
"""


@pytest.mark.slow
def test_killed_cache_writer_leaves_no_entry_that_is_read_back(tmp_path):
    n = 8_000_000  # 32 MB entries: each write lasts long enough to be killed inside it
    cache = DiskCache(tmp_path, "f" * 32)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(n)], env=env)
    full = 4 * n + 16
    caught = None
    deadline = time.monotonic() + 120
    try:
        while caught is None and time.monotonic() < deadline:
            done = list(tmp_path.rglob("*.f32"))
            for tmp in tmp_path.rglob(".tmp-*"):
                try:
                    if done and tmp.stat().st_size < full:
                        writer.send_signal(signal.SIGKILL)  # mid-write
                        caught = tmp
                        break
                except FileNotFoundError:
                    pass
    finally:
        writer.kill()
        writer.wait()
    assert caught is not None, "the writer was never seen mid-write"
    leftovers = list(tmp_path.rglob(".tmp-*"))
    assert leftovers, "the killed writer left its half-written temporary file"
    entries = sorted(tmp_path.rglob("*.f32"))
    assert cache_info(tmp_path)["entries"] == len(entries) >= 1  # temporary files are not entries
    base = np.arange(n, dtype=np.float32)
    for path in entries:  # every entry that exists is whole and right
        index = int(path.stem, 16)
        np.testing.assert_array_equal(cache.get(path.stem, n), base + index)
    unfinished = f"{len(entries):032x}"  # the entry being written when the writer died
    assert cache.get(unfinished, n) is None
    cache.put(unfinished, base)  # and the cache keeps working
    np.testing.assert_array_equal(cache.get(unfinished, n), base)


def test_full_disk_while_caching_still_returns_every_feature(tmp_path, small):
    X, _ = small
    expected = tmp_path / "expected.npy"
    np.save(expected, ImageEmbedder().fit_transform(X))
    cache = tmp_path / "cache"
    # A file-size limit makes every cache write fail part-way with EFBIG, as a full
    # disk fails with ENOSPC, for any user (no tmpfs mount or root needed).
    code = f"""
    import resource, signal, warnings, numpy as np
    from sktransfer import ImageEmbedder
    embedder = ImageEmbedder(cache_dir={str(cache)!r}).fit()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))  # an entry is 5136 bytes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        features = embedder.transform({X!r})
    assert np.array_equal(features, np.load({str(expected)!r})), "features differ"
    messages = [str(w.message) for w in caught]
    assert sum("Could not write to the feature cache" in m for m in messages) == 1, messages
    """
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert cache_info(cache)["entries"] == 0
    assert not [p for p in cache.rglob("*") if p.is_file()]  # no half-written file is left behind
    # With room again, the same folder caches normally.
    sktransfer.clear_cache()
    ImageEmbedder(cache_dir=cache).fit_transform(X)
    assert cache_info(cache)["entries"] == len(X)


def test_cache_dir_that_is_a_file_costs_a_warning_not_the_features(tmp_path, small):
    X, _ = small
    blocker = tmp_path / "cache"
    embedder = ImageEmbedder(cache_dir=blocker).fit()  # fit refuses a file (tests/test_estimator.py); it came after
    blocker.write_text("a file where the cache folder should be")
    sktransfer.clear_cache()
    with pytest.warns(RuntimeWarning, match="Could not write to the feature cache"):
        features = embedder.transform(X[:3])
    sktransfer.clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(features, ImageEmbedder().fit_transform(X[:3]))


@pytest.mark.slow
def test_pickle_from_an_incompatible_release_is_refused_by_name(tmp_path, small):
    X, y = small
    clf = PretrainedImageClassifier(max_epochs=2, random_state=0).fit(X, y)
    good, old = tmp_path / "model.joblib", tmp_path / "other-release.joblib"
    joblib.dump(clf, good)
    version = sktransfer.__version__
    other = "9" + version[1:]  # same length, another major release
    data = good.read_bytes()
    stored = b"\x8c" + bytes([len(version)]) + version.encode()
    assert data.count(stored) >= 1
    old.write_bytes(data.replace(stored, b"\x8c" + bytes([len(other)]) + other.encode()))

    load = "import sys, joblib\nmodel = joblib.load(sys.argv[1])\nprint(model.predict(sys.argv[2:]))\n"
    ok = _run(load, good, *X[:2])
    assert ok.returncode == 0, ok.stderr
    refused = _run(load, old, *X[:2])
    assert refused.returncode != 0
    assert f"saved with sktransfer {other} and cannot be loaded with sktransfer {version}" in refused.stderr


def test_outputs_reach_the_disk_before_they_replace_the_old_file_and_cache_entries_do_not_wait(
        tmp_path, small, synced):
    # A saved model or report must survive a power cut whole: its bytes are synced before the
    # rename makes them visible, and the folder after the rename. A cache entry is not synced
    # (its checksum catches a torn one, which is recomputed; a sync per image would slow embedding).
    X, y = small
    clf = PretrainedImageClassifier(random_state=0).fit(X, y)
    synced.clear()
    folder = sktransfer.save_model(clf, tmp_path / "model")
    files = [p for p in Path(folder).iterdir() if p.is_file()]
    assert {("file", p.stat().st_ino) for p in files} <= set(synced), synced
    assert ("folder", Path(folder).stat().st_ino) in synced
    assert ("folder", tmp_path.stat().st_ino) in synced  # the new folder's entry in its parent
    synced.clear()
    sktransfer.clear_cache()  # embedded afresh, so every entry is written
    ImageEmbedder(cache_dir=tmp_path / "cache").fit_transform(X)
    assert cache_info(tmp_path / "cache")["entries"] == len(X) and synced == []


def test_rewriting_a_file_keeps_its_permissions_and_writes_through_a_link(tmp_path):
    # As an editor or cp does: a private file stays private when an output replaces it, and an
    # output named by a link updates the file the link points to (the link stays a link).
    from sktransfer._outputs import write_atomic

    secret = tmp_path / "secret.csv"
    secret.write_bytes(b"old")
    secret.chmod(0o600)
    write_atomic(secret, b"new")
    assert secret.read_bytes() == b"new" and stat.S_IMODE(secret.stat().st_mode) == 0o600

    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "link.csv"
    link.symlink_to(secret)
    write_atomic(link, b"through the link")
    assert link.is_symlink() and os.readlink(link) == str(secret)
    assert secret.read_bytes() == b"through the link" and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["links", "secret.csv"]  # no temporary file left
    assert [p.name for p in (tmp_path / "links").iterdir()] == ["link.csv"]

    fresh = tmp_path / "fresh.csv"  # a new file: what the umask leaves, as before
    umask = os.umask(0o022)
    try:
        write_atomic(fresh, b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644


def test_embed_that_cannot_write_its_features_leaves_the_old_list_of_paths(tmp_path, small):
    # The features (the larger file) are written first, their list of paths last: a write that
    # fails (here a file size limit, as a full disk would) leaves the previous pair as it was.
    resource = pytest.importorskip("resource")  # POSIX

    out, listing = tmp_path / "f.npy", tmp_path / "f.paths.txt"
    out.write_bytes(b"old features")
    listing.write_text("old list\n")
    limit = 4096  # above the list of two paths, below two rows of 1280 float32 features

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "sktransfer", "embed", *small[0][:2], "-o", str(out),
                           "--engine", "torch"], env=env, capture_output=True, text=True, preexec_fn=limited)
    assert done.returncode == 1 and "cannot write" in done.stderr, done.stderr
    assert out.read_bytes() == b"old features" and listing.read_text() == "old list\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy", "f.paths.txt"]
