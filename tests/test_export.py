"""save_model / load_model: tensors and JSON, loaded without running code or the network."""

import html
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sktransfer import (
    ImageEmbedder, PretrainedImageClassifier, PretrainedImageRegressor, clear_cache, load_model, save_model,
)
from sktransfer._head import L2_GRID
from sktransfer._cache import digest

from conftest import OFFLINE, fresh_env

ROOT = Path(__file__).resolve().parents[1]
#: Folders written by save_model in format 1 (sktransfer 0.1.0; see the README there).
FORMAT_1 = ROOT / "tests" / "data" / "model_v1"


@pytest.fixture(scope="module")
def fitted(sample):
    paths, labels = sample
    keep = list(range(5)) + list(range(30, 35)) + list(range(60, 65))
    X, y = [paths[i] for i in keep], labels[keep]
    clf = PretrainedImageClassifier(hidden_units=(16,), max_epochs=5, random_state=0,
                                    optimizer=torch.optim.AdamW, optimizer__betas=(0.8, 0.95)).fit(X, y)
    return clf, X, y


def _tiny_body():
    """A module backbone small enough to fit and save in a moment (four features)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU())


#: The tiny body's preprocessing (as the format-1 folders in tests/data were written with).
TINY_PREPROCESSING = dict(resize_size=40, crop_size=32, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.fixture(scope="module")
def tiny_images(sample):
    """24 of the bundled photos, four per class."""
    paths, labels = sample
    keep = [i for c in sorted(set(labels)) for i in np.flatnonzero(labels == c)[:4]]
    return [paths[i] for i in keep], labels[keep]


def _offline_python(code, tmp_path):
    return subprocess.run([sys.executable, "-c", OFFLINE + textwrap.dedent(code)], cwd=tmp_path, env=fresh_env(),
                          capture_output=True, text=True)


@pytest.mark.slow
def test_exported_model_predicts_identically_in_a_fresh_offline_process(tmp_path, fitted):
    clf, X, y = fitted
    folder = tmp_path / "model"
    save_model(clf, folder)
    files = json.loads((folder / "model.json").read_text())["files"]
    assert sorted(os.listdir(folder)) == sorted([files["backbone"], files["head"], "model.json"])
    # Embedded here as in the fresh process: the same images in the same batches (features
    # cached by earlier tests were computed beside other images, equal only to float rounding).
    clear_cache()
    np.save(tmp_path / "proba.npy", clf.predict_proba(X))
    code = f"""
    import numpy as np
    from sktransfer import load_model
    model = load_model({str(folder)!r})
    proba = model.predict_proba({X!r})
    assert np.array_equal(proba, np.load({str(tmp_path / 'proba.npy')!r})), "probabilities differ"
    assert model.classes_.tolist() == {clf.classes_.tolist()!r}
    print("ok")
    """
    result = _offline_python(code, tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_round_trip_keeps_parameters_classes_and_backbone(tmp_path, fitted):
    clf, X, y = fitted
    save_model(clf, tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded) is PretrainedImageClassifier
    assert {**loaded.get_params(deep=False), "backbone": None} == {**clf.get_params(deep=False), "backbone": None}
    assert loaded.classes_.dtype == clf.classes_.dtype and list(loaded.classes_) == list(clf.classes_)
    assert loaded.embedder_.backbone_.fingerprint == clf.embedder_.backbone_.fingerprint
    assert loaded.embedder_.backbone_.module is not clf.embedder_.backbone_.module
    assert len(loaded.history_) == 5
    np.testing.assert_array_equal(loaded.predict_proba(X[:4]), clf.predict_proba(X[:4]))
    np.testing.assert_array_equal(loaded.predict(X[:4]), clf.predict(X[:4]))
    loaded.fit(X, y)  # a loaded model can be trained again with its saved settings
    assert loaded.score(X, y) > 0.5


def test_the_l2_strength_of_a_full_batch_head_is_fitted_state_that_saves_and_loads(tmp_path, sample):
    # As LogisticRegressionCV's C_ and RidgeCV's alpha_: the strength the linear head was fitted at.
    paths, labels = sample
    keep = list(range(5)) + list(range(30, 35)) + list(range(60, 65))
    X, y = [paths[i] for i in keep], labels[keep]
    tuned = PretrainedImageClassifier(random_state=0).fit(X, y)
    assert tuned.weight_decay_ == tuned.head_.l2 and tuned.weight_decay_ in L2_GRID
    given = PretrainedImageRegressor(weight_decay=0.3, random_state=0).fit(X, np.arange(len(X), dtype=float))
    assert given.weight_decay_ == 0.3
    adamw = PretrainedImageClassifier(hidden_units=(8,), max_epochs=1, random_state=0).fit(X, y)
    assert adamw.weight_decay_ is None  # AdamW's decay is a setting of the optimizer, not a fitted strength
    for model in (tuned, given, adamw):
        folder = tmp_path / type(model).__name__ / str(model.weight_decay_)
        save_model(model, folder)
        loaded = load_model(folder)
        assert loaded.weight_decay_ == model.weight_decay_
        assert _boxes(loaded) == _boxes(model)  # the notebook diagram tells the same story


def _boxes(model):
    """The details of the boxes of the model's notebook diagram."""
    return [html.unescape(d) for d in re.findall(r"<pre>([^<]*)</pre>", model._repr_html_())]


def test_files_hold_only_json_and_tensors(tmp_path, fitted):
    clf, _, _ = fitted
    save_model(clf, tmp_path)
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["backbone"]["name"] == "efficientnet_lite0" and info["params"]["optimizer"] == "torch.optim.AdamW"
    assert info["backbone"]["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert sorted(info["files"]) == ["backbone", "head"]
    for part, name in info["files"].items():
        # Each named by its content: a new save never overwrites the files model.json names.
        assert name == f"{part}-{digest((tmp_path / name).read_bytes())}.pt"
        state = torch.load(tmp_path / name, weights_only=True)
        assert all(torch.is_tensor(v) for v in state.values())


def test_integer_labels_and_embedder(tmp_path, digits_small):
    X, y = digits_small
    clf = PretrainedImageClassifier(max_epochs=3, random_state=0).fit(X[:12], y[:12])
    loaded = load_model(save_model(clf, tmp_path / "clf"))
    assert loaded.classes_.tolist() == clf.classes_.tolist() and loaded.predict(X[:2]).dtype.kind == "i"
    embedder = ImageEmbedder(backbone="resnet18", weights=None).fit()
    again = load_model(save_model(embedder, tmp_path / "emb"))
    np.testing.assert_array_equal(again.transform(X[:2]), embedder.transform(X[:2]))


def test_every_folder_made_for_a_saved_model_has_its_entry_synced(tmp_path, tiny_images, synced):
    # A power cut must not lose a folder that save_model made (and the synced files in it):
    # each new level's entry in its parent reaches the disk, not only the deepest one's.
    X, _ = tiny_images
    embedder = ImageEmbedder(backbone=_tiny_body(), preprocessing=TINY_PREPROCESSING).fit()
    (tmp_path / "kept").mkdir()
    folder = save_model(embedder, tmp_path / "kept" / "a" / "b" / "model")
    levels = [tmp_path / "kept", tmp_path / "kept" / "a", tmp_path / "kept" / "a" / "b", Path(folder)]
    assert {("folder", p.stat().st_ino) for p in levels} <= set(synced), synced
    assert ("folder", tmp_path.stat().st_ino) not in synced  # the folders that were there already are left alone
    loaded = load_model(folder, backbone=_tiny_body())
    np.testing.assert_array_equal(loaded.transform(X[:2]), embedder.transform(X[:2]))


def test_user_module_backbone_needs_the_module_at_load(tmp_path, fitted):
    _, X, y = fitted
    net = _tiny_body()
    prep = dict(resize_size=64, crop_size=56, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)
    clf = PretrainedImageClassifier(backbone=net, preprocessing=prep, max_epochs=3, random_state=0).fit(X, y)
    save_model(clf, tmp_path)
    with pytest.raises(ValueError, match=r"torch.nn.Module backbone \(Sequential\).*load_model\(folder, backbone=module\)"):
        load_model(tmp_path)
    torch.manual_seed(1)  # other initial weights: the saved ones replace them
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU())
    loaded = load_model(tmp_path, backbone=fresh)
    np.testing.assert_allclose(loaded.predict_proba(X[:3]), clf.predict_proba(X[:3]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit the architecture"):
        load_model(tmp_path, backbone=nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))


def test_calibrated_model_round_trip(tmp_path, tiny_images):
    X, y = tiny_images
    clf = PretrainedImageClassifier(backbone=_tiny_body(), preprocessing=TINY_PREPROCESSING, max_epochs=4,
                                    calibration="temperature", validation_fraction=0.5, random_state=0).fit(X, y)
    assert clf.temperature_ != 1.0
    loaded = load_model(save_model(clf, tmp_path), backbone=_tiny_body())
    assert loaded.temperature_ == clf.temperature_
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))


def test_head_settings_changed_after_fit_still_save_the_trained_head(tmp_path, tiny_images):
    X, y = tiny_images
    clf = PretrainedImageClassifier(backbone=_tiny_body(), preprocessing=TINY_PREPROCESSING, hidden_units=(8,),
                                    max_epochs=2, random_state=0).fit(X, y)
    clf.set_params(hidden_units=(32,), dropout=0.5)  # for the next fit; the trained head stays as it is
    loaded = load_model(save_model(clf, tmp_path), backbone=_tiny_body())
    assert loaded.get_params()["hidden_units"] == (32,)
    assert tuple(loaded.head_.module__hidden_units) == (8,) and loaded.head_.module__dropout == 0.0
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_folders_are_named(tmp_path, fitted):
    clf, _, _ = fitted
    with pytest.raises(ValueError, match="no model.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="load_model: .*nosuch' does not exist"):
        load_model(tmp_path / "nosuch")
    (tmp_path / "model.joblib").write_bytes(b"a pickle")
    with pytest.raises(ValueError, match="is a file, not a folder written by save_model"):
        load_model(tmp_path / "model.joblib")
    (tmp_path / "model.joblib").unlink()
    save_model(clf, tmp_path)
    info = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**info, "format_version": 99}))
    with pytest.raises(ValueError, match="newer format"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps(info))
    # A pickle in place of the tensors is refused, never executed, even named as model.json asks.
    import pickle

    planted = pickle.dumps(ImageEmbedder())
    (tmp_path / f"head-{digest(planted)}.pt").write_bytes(planted)
    (tmp_path / "model.json").write_text(json.dumps({**info, "files": {**info["files"], "head": f"head-{digest(planted)}.pt"}}))
    with pytest.raises(ValueError, match="weights_only=True"):
        load_model(tmp_path)
    with pytest.raises(TypeError, match="PretrainedImageRegressor or an ImageEmbedder"):
        save_model("model", tmp_path)


def test_links_planted_in_a_model_folder_are_replaced_not_written_through(tmp_path, fitted):
    # A shared folder's model.json (or a tensor file) planted as a link to another file: a
    # save replaces the link, and never writes the file it points to.
    clf, _, _ = fitted
    victim = tmp_path / "notes.txt"
    victim.write_text("mine")
    folder = tmp_path / "shared"
    save_model(clf, folder)
    names = json.loads((folder / "model.json").read_text())["files"]
    for name in ("model.json", names["backbone"]):
        (folder / name).unlink()
        (folder / name).symlink_to(victim)
    save_model(clf, folder)
    assert victim.read_text() == "mine"
    assert not any(p.is_symlink() for p in folder.iterdir())
    load_model(folder)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_or_a_device_in_a_model_folder_is_refused_not_read(tmp_path, fitted):
    # A FIFO would block the loader for ever, a link to /dev/zero read until memory runs out.
    clf, _, _ = fitted
    for victim in ("model.json", "backbone"):
        folder = tmp_path / victim
        save_model(clf, folder)
        name = victim if victim == "model.json" else json.loads((folder / "model.json").read_text())["files"][victim]
        (folder / name).unlink()
        if victim == "model.json":
            os.mkfifo(folder / name)
        else:
            (folder / name).symlink_to("/dev/zero")
        code = f"""
            from sktransfer import load_model
            try:
                load_model({str(folder)!r})
            except ValueError as e:
                print(e)
        """
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=fresh_env(), timeout=120,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("load_model: ") and name in result.stdout, result.stdout
        assert "not a regular file" in result.stdout


def test_tensor_files_that_would_inflate_are_refused_before_loading(tmp_path, fitted):
    # torch.load accepts compressed zip records: a small file could hold a huge tensor.
    import zipfile

    clf, _, _ = fitted
    save_model(clf, tmp_path)
    raw = io.BytesIO()
    torch.save({"weight": torch.zeros(2**24)}, raw)  # 64 MB of tensor
    packed = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw.getvalue())) as source, \
            zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            target.writestr(item.filename, source.read(item))
    planted = packed.getvalue()
    assert len(planted) < 2**20
    info = json.loads((tmp_path / "model.json").read_text())
    name = f"head-{digest(planted)}.pt"
    (tmp_path / name).write_bytes(planted)
    (tmp_path / "model.json").write_text(json.dumps({**info, "files": {**info["files"], "head": name}}))
    with pytest.raises(ValueError, match=f"load_model: .*{name}.* compressed"):
        load_model(tmp_path)


def test_an_architecture_its_tensors_do_not_fit_is_refused_before_it_is_built(tmp_path, fitted, monkeypatch):
    # model.json naming a network larger than its tensors (vit_large: 300M parameters) cost that
    # network's build, gigabytes, before the tensors were found not to fit. Its shapes are compared
    # on PyTorch's meta device first: no parameter of it is ever made in memory.
    import sktransfer._backbones as backbones

    clf, _, _ = fitted
    save_model(clf, tmp_path)
    info = json.loads((tmp_path / "model.json").read_text())
    info["backbone"]["name"] = "timm/vit_large_patch16_224"
    (tmp_path / "model.json").write_text(json.dumps(info))
    built = []
    real_freeze = backbones._Body

    def recording(net):
        built.append(next(net.parameters()).device.type)
        return real_freeze(net)

    monkeypatch.setattr(backbones, "_Body", recording)
    with pytest.raises(ValueError, match="load_model: .*do not fit the architecture 'timm/vit_large_patch16_224'"):
        load_model(tmp_path)
    assert built == ["meta"]


def test_json_of_too_many_values_is_refused_while_it_is_read(tmp_path, fitted):
    # A 64 MB model.json of empty objects made Python objects of gigabytes before any check.
    clf, _, _ = fitted
    save_model(clf, tmp_path)
    text = (tmp_path / "model.json").read_text()
    history = "[" + ",".join(["{}"] * 3_000_000) + "]"
    (tmp_path / "model.json").write_text(text.replace('"history": [', f'"history": {history[:-1]},', 1))
    with pytest.raises(ValueError, match="load_model: .*model.json' holds more than .* values"):
        load_model(tmp_path)


def _files(folder):
    """``{name: bytes}`` of the files in ``folder``."""
    return {f.name: f.read_bytes() for f in Path(folder).iterdir()}


@contextmanager
def _largest_file(size):
    """No file of this process can grow beyond ``size`` bytes (RLIMIT_FSIZE): as a full disk, a
    write fails (Python ignores SIGXFSZ, so ``write`` raises)."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_save_model_refuses_a_file_or_a_folder_of_other_files_before_writing(tmp_path, fitted):
    # A folder of photos is not a model's: writing into it (13 MB beside them) was allowed.
    clf, _, _ = fitted
    photos = tmp_path / "photos"
    (photos / "cardboard").mkdir(parents=True)
    (photos / "notes.txt").write_text("taken on Monday")
    with pytest.raises(ValueError, match=f"^{re.escape(repr(str(photos)))} is a folder of other files, not a "
                                         "saved model"):
        save_model(clf, photos)
    assert sorted(os.listdir(photos)) == ["cardboard", "notes.txt"]
    (tmp_path / "model.joblib").write_bytes(b"a pickle")
    with pytest.raises(ValueError, match="is a file; save_model writes a folder"):
        save_model(clf, tmp_path / "model.joblib")
    assert (tmp_path / "model.joblib").read_bytes() == b"a pickle"


@pytest.mark.parametrize("fails_at", ["tensors", "model.json"])
def test_a_save_that_fails_leaves_the_previous_model_as_it_was(tmp_path, tiny_images, fails_at):
    """A save that cannot write (a full disk) while writing the tensors, or model.json last,
    leaves the folder as it was: the previous model loads, and no file of the failed save is left."""
    from sklearn.base import clone

    X, y = tiny_images
    old = PretrainedImageClassifier(backbone=_tiny_body(), preprocessing=TINY_PREPROCESSING, hidden_units=(8,),
                                    max_epochs=2, random_state=0).fit(X, y)
    new = clone(old).set_params(max_epochs=10, random_state=1).fit(X, y)  # a longer history: a larger model.json
    sizes = {name: len(data) for name, data in _files(save_model(new, tmp_path / "scratch")).items()}
    largest_tensors = max(size for name, size in sizes.items() if name != "model.json")
    assert sizes["model.json"] > largest_tensors  # so a size limit can stop either step
    folder = tmp_path / "model"
    save_model(old, folder)
    before = _files(folder)
    with _largest_file(largest_tensors - 1 if fails_at == "tensors" else largest_tensors), pytest.raises(OSError):
        save_model(new, folder)
    assert _files(folder) == before
    np.testing.assert_array_equal(load_model(folder, backbone=_tiny_body()).predict_proba(X), old.predict_proba(X))
    save_model(new, folder)  # a save that can write replaces the model whole
    assert _files(folder) == _files(tmp_path / "scratch")
    np.testing.assert_array_equal(load_model(folder, backbone=_tiny_body()).predict_proba(X), new.predict_proba(X))


def test_a_folder_mixing_two_saves_is_refused(tmp_path, fitted):
    """A tensor file copied in from another save, under the name model.json gives it, is refused."""
    import shutil

    from sklearn.base import clone

    clf, X, y = fitted
    other = clone(clf).set_params(random_state=1).fit(X, y)  # a head of the same shape, other weights
    save_model(clf, tmp_path / "a")
    save_model(other, tmp_path / "b")
    assert load_model(tmp_path / "a").predict(X).tolist() == clf.predict(X).tolist()
    head = json.loads((tmp_path / "a" / "model.json").read_text())["files"]["head"]
    shutil.copy(next((tmp_path / "b").glob("head-*.pt")), tmp_path / "a" / head)
    with pytest.raises(ValueError, match=f"{head} .* not the one model.json was saved with"):
        load_model(tmp_path / "a")


def test_regressor_and_multilabel_round_trip(tmp_path, digits_small):
    from sktransfer import PretrainedImageRegressor

    X, y = digits_small
    reg = PretrainedImageRegressor(max_epochs=5, random_state=0).fit(X, np.c_[y, 2.0 * y + 1])
    save_model(reg, tmp_path / "reg")
    loaded = load_model(tmp_path / "reg")
    assert type(loaded) is PretrainedImageRegressor and loaded.n_outputs_ == 2
    np.testing.assert_array_equal(loaded.predict(X[:4]), reg.predict(X[:4]))
    single = PretrainedImageRegressor(max_epochs=5, random_state=0).fit(X, y.astype(float))
    save_model(single, tmp_path / "single")
    assert load_model(tmp_path / "single").predict(X[:3]).shape == (3,)

    Y = np.c_[y == 0, y != 1].astype(int)
    tagger = PretrainedImageClassifier(max_epochs=5, random_state=0).fit(X, Y)
    save_model(tagger, tmp_path / "tags")
    loaded = load_model(tmp_path / "tags")
    assert loaded.multilabel_
    np.testing.assert_array_equal(loaded.predict_proba(X[:4]), tagger.predict_proba(X[:4]))
    np.testing.assert_array_equal(loaded.predict(X[:4]), tagger.predict(X[:4]))


def test_machine_local_settings_are_not_saved_and_ignored_at_load(tmp_path, fitted):
    clf, X, _ = fitted
    author_cache = tmp_path / "author-cache"
    clf.set_params(cache_dir=str(author_cache))
    try:
        save_model(clf, tmp_path / "model")
    finally:
        clf.set_params(cache_dir=None)
    text = (tmp_path / "model" / "model.json").read_text()
    assert "author-cache" not in text
    info = json.loads(text)
    assert not {"cache_dir", "device"} & set(info["params"])
    assert not {"compile", "embed_batch_size"} & set(info["params"])
    # A folder from someone else that names a cache, a device and a weights file anyway, and how
    # to run here: compiling, and a batch of a billion images (each predict one batch, out of memory).
    planted = tmp_path / "planted"
    info["params"].update(cache_dir=str(planted), device="cuda:7", weights=str(tmp_path / "w.pth"),
                          compile=True, embed_batch_size=10**9)
    (tmp_path / "model" / "model.json").write_text(json.dumps(info))
    loaded = load_model(tmp_path / "model")
    defaults = PretrainedImageClassifier().get_params()
    local = ("cache_dir", "device", "weights", "compile", "embed_batch_size")
    assert [loaded.get_params()[k] for k in local] == [defaults[k] for k in local]
    np.testing.assert_array_equal(loaded.predict_proba(X[:2]), clf.predict_proba(X[:2]))
    assert not planted.exists()


def test_continued_training_refuses_a_body_changed_since_the_fit(tmp_path, tiny_images):
    # The fitted model's own body is reused only for a loaded model, whose weights= cannot say
    # where its body came from; a weights file rewritten since the fit gives other features.
    X, y = tiny_images
    torch.save(_tiny_body().state_dict(), tmp_path / "w.pth")
    clf = PretrainedImageClassifier(_tiny_body(), weights=str(tmp_path / "w.pth"), preprocessing=TINY_PREPROCESSING,
                                    hidden_units=(8,), max_epochs=1, warm_start=True, random_state=0).fit(X, y)
    other = _tiny_body()
    with torch.no_grad():
        other[0].weight.mul_(2.0)
    torch.save(other.state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="gives other features"):
        clf.fit(X, y)
    # Settings equal in value but not the same objects (arrays in the preprocessing) go on.
    arrays = dict(TINY_PREPROCESSING, mean=np.array(TINY_PREPROCESSING["mean"]), std=np.array(TINY_PREPROCESSING["std"]))
    again = PretrainedImageClassifier(_tiny_body(), preprocessing=arrays, hidden_units=(8,), max_epochs=1,
                                      warm_start=True, random_state=0).fit(X, y)
    again.set_params(preprocessing=dict(arrays, mean=np.array(TINY_PREPROCESSING["mean"])))
    again.fit(X, y)


def test_a_timm_or_torchvision_network_given_as_a_module_saves_and_loads(tmp_path, tiny_images):
    import timm
    import torchvision

    X, y = tiny_images
    for make in (torchvision.models.mobilenet_v3_small, lambda: timm.create_model("resnet18", pretrained=False)):
        torch.manual_seed(0)
        clf = PretrainedImageClassifier(make(), hidden_units=(8,), max_epochs=2, random_state=0).fit(X[:6], y[:6])
        save_model(clf, tmp_path / "model")
        loaded = load_model(tmp_path / "model", backbone=make())
        np.testing.assert_allclose(loaded.predict_proba(X[:2]), clf.predict_proba(X[:2]), atol=1e-6)


def test_a_loaded_model_fitted_with_a_weights_file_trains_on_in_its_saved_body(tmp_path, tiny_images):
    # The file's path is a setting of one machine, not saved: the loaded model's weights= is the
    # default. partial_fit and warm_start continue the model it is, on the body saved with it.
    X, y = tiny_images
    tuned = _tiny_body()
    with torch.no_grad():
        for p in tuned.parameters():
            p.mul_(1.5)
    torch.save(tuned.state_dict(), tmp_path / "tuned.pth")
    clf = PretrainedImageClassifier(_tiny_body(), weights=str(tmp_path / "tuned.pth"), preprocessing=TINY_PREPROCESSING,
                                    hidden_units=(8,), max_epochs=2, random_state=0).fit(X, y)
    save_model(clf, tmp_path / "model")
    for continued in ("partial_fit", "warm_start"):
        loaded = load_model(tmp_path / "model", backbone=_tiny_body())
        assert loaded.get_params()["weights"] == "DEFAULT"
        for _ in range(2):  # and on again
            if continued == "partial_fit":
                loaded.partial_fit(X, y)
            else:
                loaded.set_params(warm_start=True).fit(X, y)
        assert loaded.embedder_.backbone_.fingerprint == clf.embedder_.backbone_.fingerprint
        np.testing.assert_array_equal(loaded.embedder_.transform(X[:2]), clf.embedder_.transform(X[:2]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, fitted):
    folder = tmp_path_factory.mktemp("saved")
    save_model(fitted[0], folder)
    return folder, json.loads((folder / "model.json").read_text())


def _set(path, value):
    def edit(info):
        *parents, last = path.split(".")
        node = info
        for key in parents:
            node = node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return edit


def _both(*edits):
    def edit(info):
        for one in edits:
            one(info)
    return edit


def _classes(values, dtype):
    return _both(_set("classes.values", values), _set("classes.dtype", dtype))


@pytest.mark.parametrize("edit, field", [
    (_set("backbone.preprocessing.crop_size", 10**6), "backbone.preprocessing.crop_size"),
    (_set("backbone.preprocessing.std", [0.5, 0.0, 0.5]), "backbone.preprocessing.std"),
    (_set("head.hidden_units", [40000]), "head.hidden_units"),
    (_set("head.hidden_units", [40000, 40000]), "head.hidden_units"),
    (_set("head.in_features", 10**12), "head.in_features"),
    (_set("head.n_outputs", 10**9), "head.n_outputs"),
    (_set("head.temperature", 0), "head.temperature"),
    (_set("head.temperature", "hot"), "head.temperature"),
    (_set("head.dropout", 2), "head.dropout"),
    (_set("head.hidden_units", "(16,)"), "head.hidden_units"),
    (_set("backbone.num_features", KeyError), "backbone.num_features"),
    (_set("files", ["head.pt"]), "files"),
    (_set("files.head", 7), "files.head"),
    (_set("files.head", KeyError), "files.head"),
    (_set("files.head", "../classifier/head.pt"), "files.head"),  # only a file of the folder, named by digest
    (_set("files.head", "head.pt"), "files.head"),
    (lambda info: info["files"].update(head=info["files"]["backbone"]), "files.head"),
    (lambda info: info["files"].update(extra="head-" + "0" * 32 + ".pt"), "files.extra"),
    (_set("backbone", []), "backbone.name"),
    (_set("classes.dtype", "V1000000000"), "classes.dtype"),
    (_set("classes.values", ["a"]), "classes.values"),
    (_set("classes.values", [["a"]] * 6), "classes.values"),
    (_set("classes.multilabel", "no"), "classes.multilabel"),
    # Labels the saved dtype cannot hold unchanged, or that fit could not have given (3 classes).
    (_classes(["cat", "car", "cow"], "<U1"), "classes.values"),
    (_classes([1.5, 2, 3], "<i8"), "classes.values"),
    (_classes(["x", "y", "z"], "|b1"), "classes.values"),
    (_classes([300, 301, 302], "|i1"), "classes.values"),
    (_classes(["b", "a", "c"], "<U1"), "classes.values"),
    (_classes(["a", "a", "c"], "<U1"), "classes.values"),
    (_classes(["a", 1, "c"], "object"), "classes.values"),
    # Calibration is for one label per image (a softmax).
    (_both(_set("classes.multilabel", True), _set("head.temperature", 2.0)), "head.temperature"),
    # Settings that reach the head that predicts are checked when it is built.
    (_set("params.module__bogus", 1), "params.module__bogus"),
    (_set("params.bogus", 1), "params.bogus"),
    (_set("params.module__hidden_units", [40000, 40000]), "params.module__hidden_units"),
    (_set("params.lr", -3), "lr"),
    (_set("history", "epochs"), "history"),
    (_set("head.weight_decay", -1.0), "head.weight_decay"),
    (_set("head.weight_decay", "auto"), "head.weight_decay"),
])
def test_wrong_model_json_fields_are_named(tmp_path, saved, edit, field):
    import copy
    import shutil

    folder, info = saved
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    info = copy.deepcopy(info)
    edit(info)
    (tmp_path / "model.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_model(tmp_path)


@pytest.mark.parametrize("edit, field", [
    (_set("targets.scale", [1.0, 0.0]), "targets.scale"),
    (_set("targets.mean", [1.0]), "targets.mean"),
    (_set("targets.mean", ["1", 2]), "targets.mean"),
    (_set("targets.single_output", KeyError), "targets.single_output"),
    (_set("targets", None), "targets.mean"),
    (_set("targets.single_output", True), "targets.single_output"),  # it has two outputs
    (_set("files", {"head.pt": 7}), "files.head.pt"),  # format 1 kept digests under the file names
])
def test_wrong_regressor_fields_are_named(tmp_path, edit, field):
    import shutil

    shutil.copytree(FORMAT_1 / "regressor", tmp_path, dirs_exist_ok=True)
    info = json.loads((tmp_path / "model.json").read_text())
    edit(info)
    (tmp_path / "model.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_model(tmp_path, backbone=_tiny_body())


@pytest.mark.parametrize("key, value", [
    ("callbacks__print_log", "x"),
    ("criterion__weight", [1.0] * 6),
    ("optimizer__no_such_argument", 1),
    ("iterator_train__batch_size", "x"),
    ("dataset__length", "x"),
    ("callbacks", ["x"]),  # refused by the next fit
    ("unfreeze", 2),
])
def test_training_settings_are_kept_but_do_not_build_the_loaded_head(tmp_path, tiny_images, key, value):
    """Settings that only train the head are the next fit's business (checked then, as set_params
    settings are); the head that predicts is the saved one, without fine-tuned blocks."""
    import shutil

    X, _ = tiny_images
    shutil.copytree(FORMAT_1 / "classifier", tmp_path, dirs_exist_ok=True)
    info = json.loads((tmp_path / "model.json").read_text())
    info["params"][key] = value
    (tmp_path / "model.json").write_text(json.dumps(info))
    loaded = load_model(tmp_path, backbone=_tiny_body())
    assert loaded.get_params()[key] == (tuple(value) if isinstance(value, list) and key != "callbacks" else value)
    assert loaded.unfreeze_ == 0
    original = load_model(FORMAT_1 / "classifier", backbone=_tiny_body())
    np.testing.assert_array_equal(loaded.predict_proba(X), original.predict_proba(X))


def test_settings_changed_for_the_next_fit_still_load(tmp_path, tiny_images):
    X, y = tiny_images
    clf = PretrainedImageClassifier(backbone=_tiny_body(), preprocessing=TINY_PREPROCESSING, max_epochs=2,
                                    optimizer=torch.optim.SGD, optimizer__momentum=0.9, callbacks=[],
                                    random_state=0).fit(X, y)
    # For the next fit: fine-tune two blocks with the default optimizer (momentum is SGD's).
    clf.set_params(unfreeze=2, optimizer=None)
    loaded = load_model(save_model(clf, tmp_path), backbone=_tiny_body())
    assert {**loaded.get_params(deep=False), "backbone": None} == {**clf.get_params(deep=False), "backbone": None}
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))


@pytest.mark.parametrize("name", ["classifier", "regressor", "embedder"])
def test_format_1_folders_load_and_save_back_unchanged(tmp_path, tiny_images, name):
    X, y = tiny_images
    model = load_model(FORMAT_1 / name, backbone=_tiny_body())
    written = json.loads((FORMAT_1 / name / "model.json").read_text())
    # How fast a machine runs the model (compile, the embedding batch) is no longer saved.
    for key in ("compile", "batch_size" if name == "embedder" else "embed_batch_size"):
        written["params"].pop(key)
    if name == "classifier":
        assert model.classes_.tolist() == sorted(set(y)) and model.temperature_ != 1.0
        assert set(model.predict(X)) <= set(y)
    import shutil

    shutil.copytree(FORMAT_1 / name, tmp_path, dirs_exist_ok=True)
    save_model(model, tmp_path)  # over the format-1 folder: its backbone.pt and head.pt go
    again = json.loads((tmp_path / "model.json").read_text())
    # Saving now writes format 2: the tensor files named by their content, as model.json names them.
    assert (written.pop("format_version"), again.pop("format_version")) == (1, 2)
    files = again.pop("files")
    assert sorted(os.listdir(tmp_path)) == sorted([*files.values(), "model.json"])
    # The fingerprint is the loading release's (features are versioned: FEATURE_VERSION).
    backbone = model.backbone_ if name == "embedder" else model.embedder_.backbone_
    assert again["backbone"].pop("fingerprint") == backbone.fingerprint
    written["backbone"].pop("fingerprint")
    if name == "regressor":  # format 1 wrote a temperature of 1.0 for regressors, which have none
        assert written["head"].pop("temperature") == 1.0
    assert {**again, "sktransfer_version": None} == {**written, "sktransfer_version": None}
    assert sorted(files) == (["backbone"] if name == "embedder" else ["backbone", "head"])
    for part, file in files.items():
        old, new = (torch.load(path, weights_only=True) for path in (FORMAT_1 / name / f"{part}.pt", tmp_path / file))
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    reloaded = load_model(tmp_path, backbone=_tiny_body())
    method = "transform" if name == "embedder" else "predict"
    np.testing.assert_array_equal(getattr(reloaded, method)(X), getattr(model, method)(X))


def test_malformed_json_is_a_value_error(tmp_path, saved):
    import shutil

    shutil.copytree(saved[0], tmp_path, dirs_exist_ok=True)
    for text in ("[" * 100_000 + "]" * 100_000, '{"format": "sktransfer-model"', "\xff"):
        (tmp_path / "model.json").write_bytes(text.encode("latin-1"))
        with pytest.raises(ValueError, match="model.json"):
            load_model(tmp_path)
