"""Bad inputs, labels and parameters: one clear error, before long work starts."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.exceptions import NotFittedError
from skorch.callbacks import Callback

from sktransfer import ImageInputError, PretrainedImageClassifier
from sktransfer._backbones import build_backbone

from conftest import ForwardCounter

QUICK = dict(max_epochs=2, random_state=0)


@pytest.fixture(scope="module")
def small(sample):
    """8 photos of 2 classes."""
    paths, labels = sample
    keep = list(range(4)) + list(range(30, 34))
    return [paths[i] for i in keep], labels[keep]


class TrainingWatch(Callback):
    """Records whether head training started."""

    def __init__(self):
        self.started = False

    def on_train_begin(self, net, **kwargs):
        self.started = True


def _bad_files(tmp_path, photo_bytes):
    """Every kind of unusable path, as real files on disk."""
    (tmp_path / "a-folder.jpg").mkdir()
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "truncated.jpg").write_bytes(photo_bytes[: len(photo_bytes) // 2])
    (tmp_path / "notes.jpg").write_text("this is a text file, not a photo\n")
    Image.new("RGB", (600, 600), "white").save(tmp_path / "huge.png")
    return {
        "missing.jpg": "file not found",
        "a-folder.jpg": "is a folder",
        "zero.jpg": "empty (0 bytes)",
        "truncated.jpg": "damaged or truncated",
        "notes.jpg": "not an image file Pillow can read",
        "huge.png": "decompression-bomb limit",
    }


def test_every_unusable_file_is_listed_in_one_error_before_any_work(tmp_path, small, monkeypatch):
    X, y = small
    expected = _bad_files(tmp_path, Path(X[0]).read_bytes())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400 * 400)  # huge.png is 600x600, the photos 288x384
    bad = [str(tmp_path / name) for name in expected]
    X_all = X[:4] + bad + X[4:]
    y_all = list(y[:4]) + [y[0]] * len(bad) + list(y[4:])
    watch = TrainingWatch()
    with ForwardCounter(build_backbone("efficientnet_lite0").module) as counter:
        with pytest.raises(ImageInputError) as info:
            PretrainedImageClassifier(callbacks=[watch], **QUICK).fit(X_all, y_all)
        assert counter.images == 0  # found before the backbone ran
    assert not watch.started
    errors = info.value.errors
    assert [i for i, _, _ in errors] == list(range(4, 4 + len(bad)))  # all of them, in order
    for (_, item, reason), (name, why) in zip(errors, expected.items()):
        assert Path(item).name == name and why in reason
    message = str(info.value)
    assert f"{len(bad)} input(s) of X" in message and all(name in message for name in expected)
    assert isinstance(info.value, ValueError)


def test_predict_lists_bad_inputs_too(tmp_path, small):
    X, y = small
    _bad_files(tmp_path, Path(X[0]).read_bytes())
    clf = PretrainedImageClassifier(**QUICK).fit(X, y)
    with pytest.raises(ImageInputError) as info:
        clf.predict([X[0], str(tmp_path / "zero.jpg"), X[1], str(tmp_path / "truncated.jpg")])
    assert [i for i, _, _ in info.value.errors] == [1, 3]


def test_damage_found_only_while_embedding_stops_before_head_training(tmp_path, small):
    X, y = small
    data = Path(X[0]).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])  # header fine, pixels missing
    watch = TrainingWatch()
    X_bad = X + [str(tmp_path / "truncated.jpg")]
    with pytest.raises(ImageInputError, match=r"\[8\] .*truncated.jpg.*truncated"):
        PretrainedImageClassifier(callbacks=[watch], **QUICK).fit(X_bad, list(y) + [y[0]])
    assert not watch.started


def test_unreadable_file(tmp_path, small):
    X, y = small
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(Path(X[0]).read_bytes())
    secret.chmod(0)
    try:
        with open(secret, "rb"):
            pytest.skip("this process can read a chmod-000 file (it runs as root): nothing to test")
    except PermissionError:
        pass
    with pytest.raises(ImageInputError, match="permission denied"):
        PretrainedImageClassifier(**QUICK).fit(X + [str(secret)], list(y) + [y[0]])


@pytest.mark.parametrize("X, match", [
    ([], "X is empty"),
    ([None, None], r"\[1\] <NoneType>: None is not an image"),
    ([float("nan")] * 2, "NaN is not an image"),
    ([1, 2], r"int 1 is not an image or a path"),
    (np.arange(2), "ndarray of shape"),
    ("photo.jpg", "single str"),
])
def test_wrong_X_is_named_with_what_is_accepted(X, match, small):
    _, y = small
    with pytest.raises((ValueError, TypeError), match=match):
        PretrainedImageClassifier(**QUICK).fit(X, np.resize(y[3:5], len(X)) if len(X) else y)  # two classes


@pytest.mark.parametrize("make_y, match", [
    (lambda y: y[:-1], "8 images but y has 7 labels"),
    (lambda y: ["cardboard"] * 8, "single class"),
    (lambda y: np.where(np.arange(8) == 3, np.nan, np.arange(8) % 2), "missing labels"),
    (lambda y: [None] + list(y[1:]), "missing labels"),
    (lambda y: [pd.NA] + list(y[1:]), "missing labels"),
    (lambda y: pd.Series(y, dtype="string").where(np.arange(8) != 2), "missing labels"),
    (lambda y: np.linspace(0, 1, 8), "y must hold class labels"),
    (lambda y: None, "requires y"),
])
def test_wrong_y_is_named(make_y, match, small):
    X, y = small
    with ForwardCounter(build_backbone("efficientnet_lite0").module) as counter:
        with pytest.raises(ValueError, match=match):
            PretrainedImageClassifier(**QUICK).fit(X, make_y(y))
        assert counter.images == 0


def test_predict_before_fit_and_unseen_labels(small):
    X, y = small
    with pytest.raises(NotFittedError):
        PretrainedImageClassifier().predict(X)
    with pytest.raises(NotFittedError):
        PretrainedImageClassifier().predict_proba(X)
    clf = PretrainedImageClassifier(**QUICK).fit(X, y)
    with pytest.raises(ValueError, match=r"never seen in fit: 'orchid'; the model knows \['cardboard', 'glass'\]"):
        clf.score(X[:2], ["cardboard", "orchid"])


@pytest.fixture(scope="module")
def other_architecture_weights(tmp_path_factory):
    import torchvision

    path = tmp_path_factory.mktemp("weights") / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    return str(path)


BAD_PARAMS = [
    (dict(backbone="resnt18"), "Did you mean 'resnet18'"),
    (dict(backbone="efficientnet_lite"), "Did you mean 'efficientnet_lite0'"),
    (dict(backbone=3), "'backbone' parameter"),
    (dict(weights="no/such/file.pth"), "no such file"),
    (dict(max_epochs=-1), "'max_epochs' parameter"),
    (dict(max_epochs=0), "'max_epochs' parameter"),
    (dict(validation_fraction=0.0), r"'validation_fraction' parameter .* range \(0.0, 1.0\)"),
    (dict(validation_fraction=1.0), "'validation_fraction' parameter"),
    (dict(validation_fraction=-0.2), "'validation_fraction' parameter"),
    (dict(batch_size=0), "'batch_size' parameter"),
    (dict(embed_batch_size=-3), "'embed_batch_size' parameter"),
    (dict(lr=0), "'lr' parameter"),
    (dict(dropout=1.0), "'dropout' parameter"),
    (dict(hidden_units=(0,)), "hidden_units"),
    (dict(device="tpu"), "not a torch device"),
    (dict(class_weight={"orchid": 2.0}), "class_weight names classes not in y: 'orchid'"),
    (dict(class_weight="even"), "'class_weight' parameter"),
    (dict(preprocessing={"size": 3}), "preprocessing="),
    (dict(optimizer__betaz=(0.5, 0.6)), "optimizer__betaz: AdamW has no argument 'betaz'"),
    (dict(callbacks=["print"]), "expected skorch callbacks"),
    (dict(early_stopping=True, validation_fraction=0.1),
     r"validation_fraction=0.1 of the 8 images, stratified by class: 1 image held out for 2 classes, which "
     r"need one each"),
    (dict(early_stopping=True, validation_fraction=0.9), r"8 images held out leave 0 to train on for 2 classes"),
    (dict(calibration="temperature", validation_fraction=0.1), "calibration='temperature' holds out"),
    (dict(iterator_train__num_workers=2), "only batch_size, shuffle, drop_last apply"),
]


@pytest.mark.parametrize("params, match", BAD_PARAMS, ids=[str(p) for p, _ in BAD_PARAMS])
def test_bad_parameters_fail_at_fit_before_embedding(params, match, small):
    X, y = small
    clf = PretrainedImageClassifier(**{**QUICK, **params})  # __init__ only stores
    with ForwardCounter(build_backbone("efficientnet_lite0").module) as counter:
        with pytest.raises(ValueError, match=match):
            clf.fit(X, y)
        assert counter.images == 0


def test_weights_that_do_not_fit_the_architecture(other_architecture_weights, small):
    X, y = small
    with pytest.raises(ValueError, match="do not fit the architecture 'resnet18'"):
        PretrainedImageClassifier(backbone="resnet18", weights=other_architecture_weights, **QUICK).fit(X, y)


def test_cuda_requested_without_cuda(small):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    X, y = small
    with pytest.raises(ValueError, match="CUDA is not available"):
        PretrainedImageClassifier(device="cuda", **QUICK).fit(X, y)


def test_file_not_readable_as_weights_is_named(tmp_path):
    path = tmp_path / "weights.pth"
    # Text where weights were expected (an HTML page or a Git LFS pointer instead of the
    # download): said so, not taken for a pickled model nor told as a bare KeyError.
    for text in ("not a state dict", "hello", "version https://git-lfs.github.com/spec/v1\n"):
        path.write_text(text)
        with pytest.raises(ValueError, match=r"is a text file, not a PyTorch state dict") as caught:
            build_backbone("resnet18", weights=os.fspath(path))
        assert "pickled model" not in str(caught.value) and "KeyError" not in str(caught.value)


def test_negative_sample_weight_is_refused_before_embedding(small):
    X, y = small
    weights = np.ones(len(X))
    weights[2] = -1.0
    with ForwardCounter(build_backbone("efficientnet_lite0").module) as counter:
        with pytest.raises(ValueError, match="sample_weight"):
            PretrainedImageClassifier(**QUICK).fit(X, y, sample_weight=weights)
        assert counter.images == 0


def test_images_are_read_up_to_pillows_own_refusal_and_refused_beyond_with_the_remedy(tmp_path, monkeypatch,
                                                                                       recwarn):
    """Pillow warns up to twice MAX_IMAGE_PIXELS and refuses beyond: a 108-megapixel phone photo
    (1.2x its default limit) is read, silently, as Pillow reads it; beyond, the reason says how to
    lift the limit for trusted images."""
    import warnings

    from sktransfer._images import header_error, load_pixels
    from sktransfer._backbones import build_backbone

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400 * 400)
    Image.new("RGB", (500, 400), "white").save(tmp_path / "big.png")  # 1.25x the limit
    Image.new("RGB", (600, 600), "white").save(tmp_path / "huge.png")  # 2.25x
    warnings.simplefilter("always")
    assert header_error(str(tmp_path / "big.png")) is None
    assert load_pixels(str(tmp_path / "big.png"), build_backbone("efficientnet_lite0").preprocessing).shape == (224, 224, 3)
    assert header_error(str(tmp_path / "huge.png")).endswith(
        "is above twice Pillow's decompression-bomb limit, where Pillow refuses it (PIL.Image.MAX_IMAGE_PIXELS="
        "160000; for images you trust, raise it, or set it to None)")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


