"""The feature caches and the content digests they are keyed on."""

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from sktransfer import ImageEmbedder, cache_info, clear_cache
from sktransfer import _cache
from sktransfer._augment import View
from sktransfer._backbones import build_backbone
from sktransfer._cache import DiskCache, MemoryCache, digest, namespace, view_fingerprint
from sktransfer._features import extract_features
from sktransfer._inputs import read_item

from conftest import ForwardCounter, fresh_env


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("efficientnet_lite0")


def test_memory_cache_is_bounded():
    cache = MemoryCache(max_bytes=3 * 400)
    for k in range(5):
        cache.put(k, np.zeros(100, np.float32))
    info = cache.info()
    assert info["entries"] == 3 and info["bytes"] <= 1200
    assert cache.get(0) is None and cache.get(4) is not None


def test_memory_cache_resize_evicts_down_to_the_new_bound_and_adds_nothing():
    cache = MemoryCache(max_bytes=3 * 400)
    for k in range(3):
        cache.put(k, np.zeros(100, np.float32))
    cache.resize(2 * 400)
    assert cache.info() == {"entries": 2, "bytes": 800, "max_bytes": 800}
    assert cache.get(0) is None and cache.get(2) is not None  # the least recently used went first
    cache.resize(3 * 400)
    assert cache.info()["entries"] == 2  # growing keeps every entry, and invents none


@pytest.mark.parametrize("size", [-1, 1.5, "big", None])
def test_a_bad_memory_cache_size_is_refused_and_changes_nothing(size):
    from sktransfer import set_memory_cache_size

    before = _cache.MEMORY.info()
    with pytest.raises((ValueError, TypeError), match="max_bytes"):
        set_memory_cache_size(size)
    assert _cache.MEMORY.info()["max_bytes"] == before["max_bytes"]


@pytest.mark.parametrize("value", ["abc", "-5"])
def test_a_bad_memory_cache_size_in_the_environment_is_told_and_the_default_kept(value):
    code = "import sktransfer; print(sktransfer.cache_info()['max_bytes'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**fresh_env(), "SKTRANSFER_MEMORY_CACHE_MB": value})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == 1024 * 2**20
    assert "SKTRANSFER_MEMORY_CACHE_MB" in out.stderr and repr(value) in out.stderr


def test_features_in_memory_are_written_to_a_cache_dir_given_later(tmp_path, sample):
    """Fitting first and adding cache_dir later (a notebook's order) still fills the disk cache."""
    photos = sample[0][:3]
    clear_cache()
    ImageEmbedder(engine="torch").fit_transform(photos)  # in memory only
    features = ImageEmbedder(engine="torch", cache_dir=tmp_path).fit_transform(photos)
    assert cache_info(tmp_path)["entries"] == 3
    clear_cache()  # memory only: the disk now serves them
    np.testing.assert_array_equal(ImageEmbedder(engine="torch", cache_dir=tmp_path).fit_transform(photos), features)


def test_namespaces_are_derived_in_one_place():
    fp = "ab" * 16
    assert namespace(fp) == fp
    assert len({namespace(fp, "view", "x"), namespace(fp, "view", "y"), namespace(fp, "prefix", 2)}) == 3
    # Unchanged derivation: disk caches written before keep their namespaces.
    assert namespace(fp, "prefix", 2) == digest(f"{fp}|prefix|2".encode())
    view = View(lambda im: im, "flip")
    assert view_fingerprint(fp, view) == namespace(fp, "view", view.key)
    assert view_fingerprint(fp, None) == fp


def _two_entries(tmp_path, sample):
    cache = tmp_path / "cache"
    clear_cache()
    ImageEmbedder(cache_dir=cache).fit_transform(sample[0][:2])
    return cache


def test_a_cache_dir_under_home_is_the_users_home(tmp_path, sample, monkeypatch):
    # "~/features" means the home folder, as in joblib.Memory and the shell, not a folder named "~" here.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    ImageEmbedder(cache_dir="~/features").fit_transform(sample[0][:1])
    assert not (tmp_path / "~").exists()
    assert cache_info("~/features")["entries"] == cache_info(tmp_path / "home" / "features")["entries"] == 1
    clear_cache("~/features")
    assert cache_info(tmp_path / "home" / "features")["entries"] == 0


def test_clear_cache_deletes_only_what_the_cache_wrote(tmp_path, sample):
    cache = _two_entries(tmp_path, sample)
    (folder,) = [p for p in cache.iterdir()]
    mine = [cache / ("c" * 32), cache / "notes.txt", folder / "zz", next(folder.iterdir()) / "keep.f32"]
    mine[0].mkdir()
    (mine[0] / "thesis.tex").write_text("years of work")
    mine[1].write_text("hello")
    mine[2].mkdir()
    mine[3].write_text("not an entry name")
    with pytest.warns(UserWarning, match="left 4 path"):
        clear_cache(cache)
    assert cache_info(cache)["entries"] == 0
    assert (mine[0] / "thesis.tex").read_text() == "years of work"
    assert all(p.exists() for p in mine)


def test_clear_cache_removes_a_whole_cache_silently(tmp_path, sample, recwarn):
    cache = _two_entries(tmp_path, sample)
    (next(cache.iterdir()) / "00").mkdir()
    (next(cache.iterdir()) / "00" / ".tmp-killed").write_bytes(b"half")
    (next(cache.iterdir()) / "01").mkdir()  # a folder emptied earlier
    clear_cache(cache)
    assert list(cache.iterdir()) == [] and not recwarn.list


def test_entry_copied_under_another_key_is_not_served(tmp_path, sample, backbone):
    cache = _two_entries(tmp_path, sample)
    a, b = (read_item(p)[0] for p in sample[0][:2])
    entry = {p.stem: p for p in cache.rglob("*.f32")}
    shutil.copyfile(entry[a], entry[b])  # b's features replaced by a's, with a's valid checksum
    clear_cache()
    with ForwardCounter(backbone.module) as counter:
        features = extract_features(sample[0][:2], backbone, cache_dir=cache)
        assert counter.images == 1
    clear_cache()
    np.testing.assert_allclose(features, extract_features(sample[0][:2], backbone), rtol=1e-4, atol=1e-5)
    assert not np.allclose(features[0], features[1])


def _get_within(cache, key, seconds=20):
    result = []
    reader = threading.Thread(target=lambda: result.append(cache.get(key, 4)), daemon=True)
    reader.start()
    reader.join(seconds)
    assert not reader.is_alive(), "the cache read hung"
    return result[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_cache_reads_only_regular_files_of_the_expected_size(tmp_path):
    cache = DiskCache(tmp_path, "f" * 32)
    keys = [f"{k:032x}" for k in range(4)]
    for key in keys:
        cache.put(key, np.arange(4, dtype=np.float32))
    paths = [Path(cache._path(key)) for key in keys]
    paths[0].unlink()
    os.mkfifo(paths[0])  # would block an open() for reading until a writer comes
    paths[1].unlink()
    paths[1].symlink_to("/dev/zero")  # would read without end
    with open(paths[2], "ab") as f:
        f.write(b"\0" * 10**6)  # longer than an entry
    assert _get_within(cache, keys[0]) is None
    assert _get_within(cache, keys[1]) is None
    assert _get_within(cache, keys[2]) is None
    np.testing.assert_array_equal(_get_within(cache, keys[3]), np.arange(4, dtype=np.float32))


def test_a_link_planted_in_the_cache_is_replaced_not_written_through(tmp_path):
    """An entry rewritten over a symbolic link replaces the link: writing through it would let
    whoever can write in the cache overwrite any file the user can."""
    cache = DiskCache(tmp_path / "cache", "f" * 32)
    key = "0" * 32
    cache.put(key, np.arange(4, dtype=np.float32))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    entry = Path(cache._path(key))
    entry.unlink()
    entry.symlink_to(victim)
    assert cache.get(key, 4) is None  # a link is not read
    assert cache.put(key, np.arange(4, dtype=np.float32)) is None
    assert victim.read_text() == "keep me" and not entry.is_symlink()
    np.testing.assert_array_equal(cache.get(key, 4), np.arange(4, dtype=np.float32))


def _rewrite_keeping_size_and_mtime(path, data):
    st = os.stat(path)
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _same_size_other_image(sample, size):
    """Another photo, padded with zeros (ignored after a JPEG's end) to ``size`` bytes."""
    data = next(d for d in (Path(p).read_bytes() for p in sample[0][40:]) if len(d) < size)
    return data + b"\0" * (size - len(data))


def test_file_rewritten_with_same_size_and_mtime_gets_new_features(photo, sample):
    other = _same_size_other_image(sample, photo.stat().st_size)
    emb = ImageEmbedder().fit()
    before = emb.transform([photo])
    _rewrite_keeping_size_and_mtime(photo, other)  # at once: within the racy window
    after = emb.transform([photo])
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, emb.transform([other]), rtol=1e-4, atol=1e-5)


def test_memoised_digest_follows_a_rewrite_that_keeps_size_and_mtime(photo, sample, monkeypatch):
    monkeypatch.setattr(_cache, "RACY_SECONDS", 0.05)
    other = _same_size_other_image(sample, photo.stat().st_size)
    os.utime(photo, ns=(0, 10**18))
    threading.Event().wait(0.2)  # the file is now older than the racy window: its digest is memoised
    first = read_item(str(photo))[0]
    assert _cache._FILE_MEMO[os.path.abspath(photo)][1] == first
    threading.Event().wait(0.02)  # let the kernel's timestamp clock tick
    _rewrite_keeping_size_and_mtime(photo, other)
    assert read_item(str(photo))[0] == digest(other) != first


def test_file_memo_is_bounded_forgetting_the_least_recently_hashed(tmp_path, sample, monkeypatch):
    monkeypatch.setattr(_cache, "RACY_SECONDS", 0.0)
    monkeypatch.setattr(_cache, "FILE_MEMO_MAX", 3)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.jpg")
        shutil.copyfile(sample[0][i], paths[-1])
    for path in paths[:3]:
        read_item(str(path))
    read_item(str(paths[0]))  # hashed again: the most recent
    for path in paths[3:]:
        read_item(str(path))
    remembered = [p for p in _cache._FILE_MEMO if p.startswith(str(tmp_path))]
    assert remembered == [os.path.abspath(paths[i]) for i in (0, 3, 4)]
    assert len(_cache._FILE_MEMO) <= 3


def test_file_replaced_between_check_and_decode_is_cached_under_what_was_decoded(tmp_path, sample, backbone):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    shutil.copyfile(sample[0][0], a)
    shutil.copyfile(sample[0][1], b)
    original, replacement = b.read_bytes(), Path(sample[0][40]).read_bytes()
    swapped = []

    def replace_b(image):  # runs while a is decoded: after b was hashed, before b is decoded
        if not swapped:
            b.write_bytes(replacement)
            swapped.append(True)
        return image

    view = View(replace_b, "replace-b-test")
    clear_cache()
    features = extract_features([str(a), str(b)], backbone, batch_size=1, view=view)
    assert swapped
    b.write_bytes(original)
    served = extract_features([str(b)], backbone, view=view)  # never the replacement's features
    clear_cache()
    np.testing.assert_allclose(served, extract_features([original], backbone, view=view), rtol=1e-4, atol=1e-5)
    # What was returned for b is what was decoded at the time.
    np.testing.assert_allclose(features[1], extract_features([replacement], backbone, view=view)[0],
                               rtol=1e-4, atol=1e-5)


def test_cache_info_and_clear_cache_refuse_a_path_that_is_not_a_folder(tmp_path):
    # A folder not created yet holds no entries; a file given as the folder is a mistake to report,
    # not an empty cache.
    assert cache_info(tmp_path / "not yet") == {"entries": 0, "bytes": 0}
    clear_cache(tmp_path / "not yet")  # nothing to do
    model = tmp_path / "model.joblib"
    model.write_bytes(b"not a folder")
    for call in (cache_info, clear_cache):
        with pytest.raises(NotADirectoryError, match=r"cache_dir '.*model\.joblib' is a file, not a folder"):
            call(model)
    assert model.read_bytes() == b"not a folder"


def _without_read_override():
    """The command prefix of a process that file permissions apply to: none for a user,
    ``setpriv`` dropping root's override of read and search permissions for root; or skip."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("runs as root, without setpriv to drop root's override of file permissions")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_cache_info_and_clear_cache_refuse_an_unreadable_folder_inside(tmp_path):
    # An unreadable namespace or sub-folder is not an empty one: counting or clearing around
    # it would report a cache smaller than it is, or leave entries behind silently.
    prefix = _without_read_override()
    caches = [tmp_path / "namespace", tmp_path / "sub-folder"]
    for cache in caches:
        for name in ("a" * 32, "b" * 32):
            DiskCache(cache, name).put("cc" + "0" * 30, np.arange(4, dtype=np.float32))
    locked = [caches[0] / ("a" * 32), caches[1] / ("a" * 32) / "cc"]
    code = (
        "import sys\n"
        "from sktransfer import cache_info, clear_cache\n"
        "for cache in sys.argv[1:]:\n"
        "    for call in (cache_info, clear_cache):\n"
        "        try:\n"
        "            print(call.__name__, 'returned', call(cache))\n"
        "        except PermissionError as e:\n"
        "            print(call.__name__, 'raised', e)\n"
    )
    for folder in locked:
        folder.chmod(0)
    try:
        done = subprocess.run([*prefix, sys.executable, "-c", code, *map(str, caches)], env=fresh_env(),
                              capture_output=True, text=True)
    finally:
        for folder in locked:
            folder.chmod(0o755)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["cache_info", "raised"], ["clear_cache", "raised"]] * 2, lines
    assert all(str(locked[i // 2]) in line for i, line in enumerate(lines)), lines  # each names its folder
    for cache in caches:
        assert cache_info(cache)["entries"] == 2  # refused before anything was deleted


def _link(link, target):
    """Make ``link`` a symbolic link to the folder ``target``, or skip where links cannot be made."""
    try:
        os.symlink(target, link, target_is_directory=True)
    except (OSError, NotImplementedError) as e:  # Windows without the privilege to make links
        pytest.skip(f"symbolic links cannot be made here: {e}")


def _tree(folder):
    """``{relative path: bytes}`` of the files under ``folder``."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("level", ["namespace", "sub-folder"])
def test_a_link_planted_below_the_cache_folder_leads_no_write_nor_read_outside(tmp_path, sample, level):
    """A namespace or sub-folder that is a symbolic link is a miss to read and a refused write:
    whoever may write in a shared cache could otherwise make it read features from, and write
    files into, any folder the user can."""
    photos = sample[0][:2]
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    clear_cache()
    features = ImageEmbedder(engine="torch", cache_dir=cache).fit_transform(photos)
    (folder,) = cache.iterdir()  # the namespace the embedder uses
    keys = [read_item(p)[0] for p in photos]
    outside.mkdir()
    if level == "namespace":
        shutil.rmtree(folder)
        _link(folder, outside)
        planted = [outside / key[:2] for key in keys]
    else:
        planted = []
        for key in keys:
            sub = folder / key[:2]
            shutil.rmtree(sub, ignore_errors=True)
            _link(sub, outside / key[:2])
            planted.append(outside / key[:2])
    for sub in planted:
        sub.mkdir(exist_ok=True)
    # The first photo's entry is there to be read through the link (well formed, other features);
    # the second's is missing, to be written through it.
    for key, sub in zip(keys[:1], planted):
        body = np.zeros(features.shape[1], np.float32).tobytes()
        (sub / f"{key}.f32").write_bytes(body + DiskCache(cache, folder.name)._check(key, body))
    before = _tree(outside)
    clear_cache()  # memory: the disk is asked
    with pytest.warns(RuntimeWarning, match="feature cache") as told:
        again = ImageEmbedder(engine="torch", cache_dir=cache).fit_transform(photos)
    assert len([w for w in told if issubclass(w.category, RuntimeWarning)]) == 1
    assert "symbolic link" in str(told[0].message)
    np.testing.assert_array_equal(again, features)  # computed, not the planted zeros
    assert _tree(outside) == before  # nothing written there, nor removed
    disk = DiskCache(cache, folder.name)
    assert not disk.has(keys[0]) and disk.get(keys[0], features.shape[1]) is None


@pytest.fixture(params=["by descriptor", "by path"])
def walk(request, monkeypatch):
    """Each way the cache walks its folders: by descriptor (POSIX), and by path with a check of
    each level (where the platform has no O_NOFOLLOW and dir_fd: Windows), run here too."""
    from sktransfer import _outputs

    if request.param == "by descriptor" and not _outputs._BY_DESCRIPTOR:
        pytest.skip("this platform walks folders by path")
    monkeypatch.setattr(_outputs, "_BY_DESCRIPTOR", request.param == "by descriptor")
    return request.param


@pytest.mark.parametrize("level", ["namespace", "sub-folder"])
def test_a_linked_level_is_a_miss_and_a_refused_write_either_way_the_folders_are_walked(tmp_path, walk, level):
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    disk = DiskCache(cache, "a" * 32)
    kept, planted = "cc" + "0" * 30, "dd" + "0" * 30
    DiskCache(outside, "a" * 32).put(planted, np.arange(4, dtype=np.float32))
    assert disk.put(kept, np.ones(4, np.float32)) is None
    if level == "namespace":
        shutil.rmtree(cache / ("a" * 32))
        _link(cache / ("a" * 32), outside / ("a" * 32))
    else:
        _link(cache / ("a" * 32) / "dd", outside / ("a" * 32) / "dd")
    before = _tree(outside)
    assert not disk.has(planted) and disk.get(planted, 4) is None
    error = disk.put(planted, np.ones(4, np.float32))
    assert isinstance(error, OSError) and "symbolic link" in str(error)
    assert _tree(outside) == before
    if level == "sub-folder":  # the levels that are no links still serve
        np.testing.assert_array_equal(disk.get(kept, 4), np.ones(4, np.float32))


def test_a_cache_dir_that_is_itself_a_link_is_the_folder_it_names(tmp_path, walk):
    """The folder the user names may be a link (their choice): only the levels below it are the cache's own."""
    target = tmp_path / "on another disk"
    target.mkdir()
    _link(tmp_path / "cache", target)
    cache = DiskCache(tmp_path / "cache", "f" * 32)
    key = "ab" + "0" * 30
    assert cache.put(key, np.arange(4, dtype=np.float32)) is None
    assert (target / ("f" * 32) / "ab" / f"{key}.f32").is_file()
    assert cache.has(key)
    np.testing.assert_array_equal(cache.get(key, 4), np.arange(4, dtype=np.float32))
    assert cache_info(tmp_path / "cache")["entries"] == 1


def test_clear_cache_and_cache_info_follow_no_link_below_the_cache_folder(tmp_path, walk):
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    mine = DiskCache(cache, "a" * 32)
    mine.put("cc" + "0" * 30, np.arange(4, dtype=np.float32))
    mine.put("dd" + "0" * 30, np.arange(4, dtype=np.float32))
    DiskCache(outside, "b" * 32).put("cc" + "1" * 30, np.arange(4, dtype=np.float32))
    DiskCache(outside, "c" * 32).put("ee" + "1" * 30, np.arange(4, dtype=np.float32))
    _link(cache / ("b" * 32), outside / ("b" * 32))  # a linked namespace
    _link(cache / ("a" * 32) / "ee", outside / ("c" * 32) / "ee")  # a linked sub-folder
    before = _tree(outside)
    assert cache_info(cache)["entries"] == 2
    with pytest.warns(UserWarning, match="left 2 path"):
        clear_cache(cache)
    assert cache_info(cache)["entries"] == 0
    assert _tree(outside) == before
    assert (cache / ("b" * 32)).is_symlink() and (cache / ("a" * 32) / "ee").is_symlink()


@pytest.mark.parametrize("call", [cache_info, clear_cache])
def test_cache_info_and_clear_cache_refuse_a_cache_dir_that_is_not_a_path(call):
    with pytest.raises(TypeError, match=r"cache_dir=5 .*str or path-like"):
        call(5)
