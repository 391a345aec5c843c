import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, RandomizedSearchCV, cross_val_score, cross_validate
from sklearn.pipeline import make_pipeline

from sktransfer import ImageEmbedder, PretrainedImageClassifier
from sktransfer._backbones import build_backbone

from conftest import ForwardCounter, assert_same_in_fresh_process

FAST = dict(max_epochs=20, random_state=0)


def test_fit_predict_proba_score_on_paths(flowers_small):
    X, y = flowers_small
    clf = PretrainedImageClassifier(**FAST).fit(X, y)
    assert list(clf.classes_) == ["daisy", "sunflower", "tulip"]
    proba = clf.predict_proba(X)
    assert proba.shape == (30, 3) and np.allclose(proba.sum(axis=1), 1)
    pred = clf.predict(X)
    assert set(pred) <= set(clf.classes_)
    np.testing.assert_array_equal(pred, clf.classes_[proba.argmax(1)])
    assert clf.score(X, y) == np.mean(pred == y) > 0.8
    assert 2 <= len(clf.history_) <= 20  # L-BFGS steps, until one no longer lowers the loss


def test_integer_labels_and_every_input_type(digits_small):
    X, y = digits_small
    clf = PretrainedImageClassifier(**FAST).fit(X, y)
    assert clf.classes_.tolist() == [0, 1, 2] and clf.predict(X[:3]).dtype.kind == "i"
    from_list = PretrainedImageClassifier(**FAST).fit(X, [int(v) for v in y])
    assert from_list.classes_.dtype.kind == "i"  # a plain list of ints keeps int labels
    images = [Image.open(p) for p in X[:3]]
    arrays = [np.asarray(im.convert("RGB")) for im in images]
    expected = clf.predict_proba(X[:3])
    for other in (images, arrays, pd.Series([Path(p) for p in X[:3]]), np.array(X[:3])):
        np.testing.assert_allclose(clf.predict_proba(other), expected, atol=1e-3)


def test_labels_given_as_lists_keep_their_kind(digits_small):
    """A list of bools, of integral floats or of ints fits as the same labels as an array of them
    (scikit-learn's classifiers accept each)."""
    X, y = digits_small
    for labels in ([bool(v) for v in y % 2], [np.bool_(v) for v in y % 2], [float(v) for v in y], [int(v) for v in y]):
        clf = PretrainedImageClassifier(max_epochs=2, random_state=0).fit(X, labels)
        expected = LogisticRegression().fit(np.eye(len(y))[:, :3], np.asarray(labels)).classes_
        np.testing.assert_array_equal(clf.classes_, expected)
        assert clf.classes_.dtype == expected.dtype and clf.predict(X[:2]).dtype == expected.dtype


def test_missing_or_mixed_labels_are_value_errors_naming_y(digits_small):
    X, _ = digits_small
    with pytest.raises(ValueError, match="requires y"):
        PretrainedImageClassifier().fit(X)
    with pytest.raises(ValueError, match=r"y mixes labels of several types \(int, str\)"):
        PretrainedImageClassifier().fit(X, [1 if i % 2 else "a" for i in range(len(X))])
    with pytest.raises(ValueError, match="collection of labels per image.*MultiLabelBinarizer"):
        PretrainedImageClassifier().fit(X, [["a", "b"] if i % 2 else ["a"] for i in range(len(X))])


def test_backbone_is_frozen_bit_for_bit(flowers_small):
    X, y = flowers_small
    module = build_backbone("efficientnet_lite0").module
    before = {k: v.clone() for k, v in module.state_dict().items()}
    clf = PretrainedImageClassifier(max_epochs=3, hidden_units=(16,)).fit(X, y)
    after = clf.embedder_.backbone_.module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm running stats included
    assert not clf.embedder_.backbone_.module.training


def test_backbone_runs_once_per_image_not_per_epoch(sample):
    from sktransfer import clear_cache

    clear_cache()
    X, y = sample[0][::7], sample[1][::7]  # 26 photos of the 6 classes
    with ForwardCounter(build_backbone("efficientnet_lite0").module) as counter:
        PretrainedImageClassifier(max_epochs=8).fit(X, y)
        assert counter.images == len(X)
        cross_val_score(PretrainedImageClassifier(max_epochs=2), X, y, cv=2)
        assert counter.images == len(X)


def test_random_state_gives_identical_models(flowers_small):
    X, y = flowers_small
    a = PretrainedImageClassifier(hidden_units=(32,), dropout=0.2, **FAST).fit(X, y).predict_proba(X)
    b = PretrainedImageClassifier(hidden_units=(32,), dropout=0.2, **FAST).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)
    c = PretrainedImageClassifier(hidden_units=(32,), dropout=0.2, max_epochs=20, random_state=1).fit(X, y)
    assert not np.array_equal(a, c.predict_proba(X))


def test_sklearn_contract():
    clf = PretrainedImageClassifier(lr=0.01, optimizer__betas=(0.8, 0.9))
    params = clf.get_params()
    assert params["lr"] == 0.01 and params["optimizer__betas"] == (0.8, 0.9)
    twin = clone(clf)
    assert twin.get_params() == params
    twin.set_params(hidden_units=(8,), optimizer__eps=1e-6)
    assert twin.hidden_units == (8,) and twin.optimizer__eps == 1e-6
    assert not hasattr(clf, "classes_")
    with pytest.raises(NotFittedError):
        clf.predict(["x.jpg"])
    # Unknown settings are stored, as skorch does, and refused at fit (tests/test_head.py).
    assert PretrainedImageClassifier(learning_rate=0.1).get_params()["learning_rate"] == 0.1


def test_nested_settings_reach_skorch(flowers_small):
    X, y = flowers_small
    clf = PretrainedImageClassifier(max_epochs=2, optimizer__betas=(0.5, 0.6), weight_decay=0.1).fit(X, y)
    group = clf.head_.optimizer_.param_groups[0]
    assert group["betas"] == (0.5, 0.6) and group["weight_decay"] == 0.1
    # A prefixed setting the estimator also sets itself: the user's value wins.
    clf = PretrainedImageClassifier(max_epochs=2, optimizer__weight_decay=0.3, iterator_train__shuffle=False,
                                    iterator_train__drop_last=True, batch_size=8).fit(X, y)
    assert clf.head_.optimizer_.param_groups[0]["weight_decay"] == 0.3
    # The fused AdamW kernel by default where torch has it on the CPU (from 2.4; pyproject allows 2.1).
    cpu_fused = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 4)
    assert bool(clf.head_.optimizer_.defaults.get("fused")) is cpu_fused
    unfused = PretrainedImageClassifier(max_epochs=2, optimizer__fused=False).fit(X, y)
    assert not unfused.head_.optimizer_.defaults["fused"]
    assert len(clf.head_.history[-1]["batches"]) == len(X) // 8  # drop_last reached the batches
    with pytest.raises(ValueError, match="iterator_train__num_workers"):
        PretrainedImageClassifier(iterator_train__num_workers=2).fit(X, y)


def test_epoch_table_only_when_verbose(flowers_small, capsys):
    X, y = flowers_small
    PretrainedImageClassifier(max_epochs=2).fit(X, y)
    assert "train_loss" not in capsys.readouterr().out
    clf = PretrainedImageClassifier(max_epochs=2, verbose=1).fit(X, y)
    assert "train_loss" in capsys.readouterr().out
    assert len(clf.history_) == 2
    # The full-batch head's table ends with the reason when L-BFGS stops before max_epochs.
    clf = PretrainedImageClassifier(verbose=1).fit(X, y)
    epochs = len(clf.history_)
    assert epochs < clf.max_epochs
    assert (f"Stopping: the L-BFGS step of epoch {epochs - 1} lowered the training loss by no more than 1e-07."
            in capsys.readouterr().out)


def test_early_stopping_holds_out_training_data(flowers_small):
    X, y = flowers_small
    clf = PretrainedImageClassifier(early_stopping=True, validation_fraction=0.2, n_iter_no_change=2,
                                    max_epochs=200, random_state=0).fit(X, y)
    history = clf.history_
    assert "valid_loss" in history[0]
    assert len(history) < 200


@pytest.mark.slow
def test_grid_search_and_cross_validation(flowers_small):
    X, y = flowers_small
    grid = {"weight_decay": [0.1, 1.0], "hidden_units": [(), (32,)]}
    search = GridSearchCV(PretrainedImageClassifier(**FAST), grid, cv=3).fit(X, y)
    assert len(search.cv_results_["params"]) == 4
    best = PretrainedImageClassifier(**FAST).set_params(**search.best_params_).fit(X, y)
    np.testing.assert_array_equal(search.predict(X), best.predict(X))
    rs = RandomizedSearchCV(PretrainedImageClassifier(**FAST), {"weight_decay": [0.03, 0.3, 3.0]}, n_iter=2,
                            cv=2, random_state=0).fit(X, y)
    assert rs.best_score_ == rs.cv_results_["mean_test_score"].max() > 1 / 3
    scores = cross_validate(PretrainedImageClassifier(**FAST), X, y, cv=3, scoring=["accuracy", "neg_log_loss"])
    # Chance is 1/3; on these 20-photo folds LogisticRegressionCV on the same features scores 0.567.
    assert scores["test_accuracy"].mean() > 0.5


def test_pipeline_of_embedder_and_sklearn_model(flowers_small):
    X, y = flowers_small
    pipe = make_pipeline(ImageEmbedder(), LogisticRegression(max_iter=1000)).fit(X, y)
    assert pipe.score(X, y) > 0.9
    features = ImageEmbedder().fit_transform(X)
    clf = PretrainedImageClassifier(**FAST).fit(X, y)
    np.testing.assert_array_equal(features, clf.embedder_.transform(X))  # one implementation


def test_pickle_loads_in_fresh_process_without_weights_or_cache(tmp_path, flowers_small):
    X, y = flowers_small
    clf = PretrainedImageClassifier(**FAST).fit(X, y)
    assert_same_in_fresh_process(clf, X, tmp_path, method="predict_proba")


def test_fit_errors_name_the_problem(flowers_small):
    X, y = flowers_small
    with pytest.raises(ValueError, match="single class"):
        PretrainedImageClassifier(**FAST).fit(X[:5], y[:5])
    with pytest.raises(ValueError, match="30 images but y has 29"):
        PretrainedImageClassifier(**FAST).fit(X, y[:-1])
    with pytest.raises(ValueError, match="'lr' parameter"):
        PretrainedImageClassifier(lr=-1).fit(X, y)
    with pytest.raises(ValueError, match="hidden_units"):
        PretrainedImageClassifier(hidden_units=(0,)).fit(X, y)
    clf = PretrainedImageClassifier(**FAST).fit(X, y)
    with pytest.raises(ValueError, match="never seen in fit"):
        clf.score(X[:2], ["daisy", "orchid"])


def test_a_cache_dir_that_is_a_file_is_refused_at_fit_before_embedding(two_of_each, tmp_path):
    # Every write to the cache would fail and be told, once per fit: six times over a cross-validation.
    from sktransfer import clear_cache

    X, y = two_of_each
    model = tmp_path / "model.joblib"
    model.write_bytes(b"not a folder")
    clear_cache()
    with ForwardCounter(build_backbone("efficientnet_lite0").module) as counter:
        for cache_dir, where in [(model, "is a file"), (str(model / "features"), "lies in the file")]:
            for estimator in (ImageEmbedder(cache_dir=cache_dir), PretrainedImageClassifier(cache_dir=cache_dir)):
                with pytest.raises(ValueError, match=f"^cache_dir='.*model.joblib.*' {where}"):
                    estimator.fit(X, y)
            with pytest.raises(ValueError, match=f"^cache_dir=.* {where}"):  # the CLI's and audit's early check
                PretrainedImageClassifier(cache_dir=cache_dir)._check_fit_settings(y)
        assert counter.images == 0
    assert model.read_bytes() == b"not a folder"


# -- weights that leave images out: the checks see the images training keeps --------

@pytest.fixture(scope="module")
def two_of_each(sample):
    """12 photos: the first two of each of the sample's 6 classes, in class order ('trash' last)."""
    paths, labels = sample
    keep = np.concatenate([np.flatnonzero(labels == c)[:2] for c in np.unique(labels)])
    return [paths[i] for i in keep], labels[keep]


def test_weights_that_leave_fewer_than_two_classes_are_refused_before_embedding(two_of_each):
    # Images of weight 0 are left out as if not given, so what is left must still be a training
    # set: a classifier used to fit on the two 'trash' photos left here and predict 'trash' for
    # every image (classes_ listing all six), and class_weight zeros for every class said "X is empty".
    from sktransfer import clear_cache

    X, y = two_of_each
    assert y[-2:].tolist() == ["trash", "trash"]
    only_trash = {c: float(c == "trash") for c in np.unique(y)}
    single = "leaves images of a single class \\('trash'\\) with weight above 0; a classifier needs at least two\\.$"
    cases = [
        ({}, {"sample_weight": [0] * 10 + [1, 1]}, "^sample_weight " + single),
        ({"class_weight": only_trash}, {}, "^class_weight " + single),
        ({"class_weight": only_trash}, {"sample_weight": np.full(12, 2.0)}, "^sample_weight \\(with class_weight\\) " + single),
        ({"class_weight": dict.fromkeys(np.unique(y), 0.0)}, {},
         "^class_weight gives every image weight 0; at least one needs weight above 0"),
    ]
    clear_cache()
    with ForwardCounter(build_backbone("efficientnet_lite0").module) as counter:
        for settings, fit_params, message in cases:
            with pytest.raises(ValueError, match=message):
                PretrainedImageClassifier(**settings).fit(X, y, **fit_params)
        assert counter.images == 0
    # As for the kept images given alone:
    with pytest.raises(ValueError, match="^y has a single class \\('trash'\\); a classifier needs at least two\\.$"):
        PretrainedImageClassifier().fit(X[-2:], y[-2:])


def test_weights_that_leave_out_a_class_fit_as_the_kept_images_alone(two_of_each):
    # The classes are those of the images training keeps, as if the others were not given.
    X, y = two_of_each
    weights = np.r_[np.zeros(2), np.ones(10)]  # no 'cardboard' left
    with_zeros = PretrainedImageClassifier(random_state=0).fit(X, y, sample_weight=weights)
    alone = PretrainedImageClassifier(random_state=0).fit(X[2:], y[2:])
    assert with_zeros.classes_.tolist() == alone.classes_.tolist() == np.unique(y[2:]).tolist()
    np.testing.assert_allclose(with_zeros.predict_proba(X), alone.predict_proba(X), atol=1e-6)
    # warm_start continues on the classes of the first fit: leaving one out by weight is refused
    # as leaving it out of y is.
    warm = PretrainedImageClassifier(warm_start=True, max_epochs=1, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="but the images sample_weight leaves with weight above 0 have "
                                         + re.escape(str(np.unique(y[2:]).tolist()))):
        warm.fit(X, y, sample_weight=weights)


def test_score_leaves_out_images_of_weight_0_as_fit_does(two_of_each):
    # GridSearchCV passes the weights to score too: a class left out by weight 0 must not make
    # every candidate's score NaN ("labels never seen in fit"), nor count in the accuracy.
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    X, y = two_of_each
    weights = np.r_[np.zeros(2), np.ones(10)]  # no 'cardboard' left
    clf = PretrainedImageClassifier(random_state=0).fit(X, y, sample_weight=weights)
    assert clf.score(X, y, sample_weight=weights) == pytest.approx(np.mean(clf.predict(X[2:]) == y[2:]))
    with pytest.raises(ValueError, match="never seen in fit: 'cardboard'"):
        clf.score(X, y)  # weighing them, it is asked to score a class it never saw
    search = GridSearchCV(PretrainedImageClassifier(random_state=0), {"weight_decay": [0.01, 1.0]},
                          cv=StratifiedKFold(2, shuffle=True, random_state=0), error_score="raise")
    search.fit(np.r_[X, X], np.r_[y, y], sample_weight=np.r_[weights, weights])
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()


def test_bad_images_are_named_by_their_index_in_X_when_weights_leave_some_out(two_of_each, tmp_path):
    from sktransfer import ImageInputError

    X, y = list(two_of_each[0]), two_of_each[1]
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    X[5] = str(tmp_path / "broken.jpg")
    weights = np.r_[np.zeros(3), np.ones(9)]
    with pytest.raises(ImageInputError, match=r"\[5\] .*broken\.jpg") as caught:
        PretrainedImageClassifier().fit(X, y, sample_weight=weights)
    assert [i for i, *_ in caught.value.errors] == [5]


def test_balanced_class_weight_counts_only_the_images_it_trains_on(flowers_small):
    # class_weight="balanced" weighs each class by its share of the images training keeps: the
    # same model as the kept images alone, not the frequencies of images left out with weight 0.
    X, y = flowers_small  # 10 daisy, 10 sunflower, 10 tulip
    weights = np.ones(len(X))
    weights[10:17] = 0.0  # 3 sunflowers kept
    kept = np.flatnonzero(weights)
    with_zeros = PretrainedImageClassifier(class_weight="balanced", random_state=0).fit(X, y, sample_weight=weights)
    alone = PretrainedImageClassifier(class_weight="balanced", random_state=0).fit([X[i] for i in kept], y[kept])
    np.testing.assert_allclose(with_zeros.predict_proba(X), alone.predict_proba(X), atol=1e-6)
