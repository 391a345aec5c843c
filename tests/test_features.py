import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sktransfer import ImageEmbedder, cache_info, clear_cache
from sktransfer._backbones import build_backbone
from sktransfer._features import extract_features

from conftest import ForwardCounter, reference_pixels


def test_each_image_runs_once_then_comes_from_memory(sample):
    clear_cache()
    backbone = build_backbone("efficientnet_lite0")
    paths = sample[0][:6]
    with ForwardCounter(backbone.module) as counter:
        first = extract_features(paths + paths[:2], backbone, batch_size=4)
        assert counter.images == 6  # duplicates are embedded once
        again = extract_features(paths, backbone)
        assert counter.images == 6
    np.testing.assert_array_equal(first[:6], again)
    np.testing.assert_array_equal(first[6:], first[:2])
    assert cache_info()["entries"] >= 6


def test_batching_does_not_change_features(sample):
    backbone = build_backbone("efficientnet_lite0")
    paths = sample[0][:5]
    clear_cache()
    a = extract_features(paths, backbone, batch_size=5)
    clear_cache()
    b = extract_features(paths, backbone, batch_size=2)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_one_image_decodes_in_the_calling_thread_with_the_same_features(sample, monkeypatch):
    backbone = build_backbone("efficientnet_lite0")
    paths = sample[0][:3]
    clear_cache()
    together = extract_features(paths, backbone, batch_size=1)

    def no_pool(*args, **kwargs):
        raise AssertionError("a thread pool was started for one image")

    monkeypatch.setattr("sktransfer._features.ThreadPoolExecutor", no_pool)
    for i, path in enumerate(paths):
        clear_cache()
        np.testing.assert_array_equal(extract_features([path], backbone), together[i:i + 1])
    clear_cache()
    with pytest.raises(AssertionError, match="thread pool"):
        extract_features(paths[:2], backbone)


def test_a_file_is_hashed_once_while_unchanged(tmp_path, sample, monkeypatch):
    import sktransfer._cache as cache_module

    path = tmp_path / "photo.jpg"
    shutil.copy(sample[0][0], path)
    # A file written just now is not remembered (racy ctime); treat it as settled.
    monkeypatch.setattr(cache_module, "RACY_SECONDS", -1e12)
    hashed = []
    real_digest = cache_module.digest
    monkeypatch.setattr(cache_module, "digest", lambda data: hashed.append(len(data)) or real_digest(data))
    backbone = build_backbone("efficientnet_lite0")
    clear_cache()
    first = extract_features([str(path)], backbone)
    assert len(hashed) == 1  # checked, then read again to decode: hashed once
    path.write_bytes(Path(sample[0][1]).read_bytes())  # rewritten: hashed afresh
    second = extract_features([str(path)], backbone)
    assert len(hashed) == 2 and not np.array_equal(first, second)


def test_disk_cache_persists_across_processes(tmp_path, sample):
    paths = sample[0][:4]
    cache = tmp_path / "cache"
    clear_cache()
    here = ImageEmbedder(cache_dir=cache).fit_transform(paths)
    assert cache_info(cache)["entries"] == 4 and cache_info(cache)["bytes"] > 4 * 1280 * 4
    np.save(tmp_path / "here.npy", here)
    # A fresh process whose backbone would fail if run: features must come from disk.
    code = (
        "import sys, numpy as np, torch\n"
        "from sktransfer import ImageEmbedder\n"
        f"e = ImageEmbedder(cache_dir={str(cache)!r}).fit()\n"
        "def boom(*a):\n    raise AssertionError('backbone ran')\n"
        "e.backbone_.module.register_forward_pre_hook(boom)\n"
        f"out = e.transform({paths!r})\n"
        f"assert np.array_equal(out, np.load({str(tmp_path / 'here.npy')!r}))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    clear_cache(cache)
    assert cache_info(cache)["entries"] == 0


def test_damaged_disk_entry_is_recomputed(tmp_path, sample):
    cache = tmp_path / "cache"
    clear_cache()
    good = ImageEmbedder(cache_dir=cache).fit_transform(sample[0][:2])
    files = sorted(Path(cache).rglob("*.f32"))
    files[0].write_bytes(files[0].read_bytes()[:-40] + b"\0" * 40)  # corrupt one entry
    files[1].write_bytes(files[1].read_bytes()[:100])  # truncate another
    clear_cache()
    backbone = build_backbone("efficientnet_lite0")
    with ForwardCounter(backbone.module) as counter:
        again = ImageEmbedder(cache_dir=cache).fit_transform(sample[0][:2])
        assert counter.images == 2
    np.testing.assert_allclose(again, good, rtol=1e-4, atol=1e-5)


def test_changed_file_is_never_served_stale_features(photo, sample):
    emb = ImageEmbedder().fit()
    before = emb.transform([photo])
    shutil.copyfile(sample[0][40], photo)  # same path, new content
    after = emb.transform([photo])
    expected = emb.transform([sample[0][40]])
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_compiled_backbone_gives_the_same_features_and_still_pickles(sample):
    import pickle

    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3))
    prep = dict(resize_size=72, crop_size=64, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)
    paths = sample[0][:7]  # 7 images in batches of 4: the last batch is padded to the compiled shape
    eager = ImageEmbedder(net, preprocessing=prep, batch_size=4, compile=False, engine="torch",
                          precision="float32").fit()
    compiled = ImageEmbedder(net, preprocessing=prep, batch_size=4, compile=True, engine="torch",
                             precision="float32").fit()
    expected = eager.transform(paths)
    clear_cache()
    np.testing.assert_allclose(compiled.transform(paths), expected, rtol=1e-4, atol=1e-5)
    plan = compiled.backbone_.plan(engine="torch", precision="float32")
    assert compiled.backbone_.runner(plan, "cpu", True, 4).compiled is not None  # it did compile
    assert compiled.backbone_._handles  # runtime handles, left out of the pickle below
    restored = pickle.loads(pickle.dumps(compiled))
    assert restored.backbone_._handles == {}
    clear_cache()
    np.testing.assert_allclose(restored.transform(paths), expected, rtol=1e-4, atol=1e-5)


def test_fast_path_matches_the_straightforward_pipeline(tmp_path, sample):
    """Draft-mode decoding, the decode thread pool, channels_last and batching
    against PIL -> torchvision transforms -> a plain eager forward."""
    import torch
    from PIL import Image

    big = tmp_path / "big.jpg"
    Image.open(sample[0][70]).convert("RGB").resize((1600, 1200)).save(big, quality=92)
    paths = [str(big)] + sample[0][::30]
    backbone = build_backbone("efficientnet_lite0")
    prep = backbone.preprocessing
    x = torch.stack([reference_pixels(prep, Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        expected = backbone.module(x.contiguous()).numpy()
    clear_cache()
    ours = ImageEmbedder(batch_size=4).fit_transform(paths)
    cosine = (ours * expected).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.99, cosine  # resize kernels differ in rounding, nothing more
