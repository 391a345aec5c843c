"""Incremental training: warm_start continues the head, partial_fit trains on batches over time."""

import re

import joblib
import numpy as np
import pytest
import torch

from sktransfer import PretrainedImageClassifier, PretrainedImageRegressor

from conftest import dataset, subset


@pytest.fixture(scope="module")
def flowers_split():
    folder = dataset("flowers5")
    classes = ["daisy", "sunflower", "tulip"]
    train, y_train = subset(folder, 10, classes)
    test, y_test = subset(folder, 5, classes, offset=10)
    return train, y_train, test, y_test


def test_warm_start_continues_from_the_current_head(flowers_split):
    X, y, _, _ = flowers_split
    warm = PretrainedImageClassifier(max_epochs=5, lr=1e-3, warm_start=True, random_state=0).fit(X, y)
    first = warm.history_[:, "train_loss"]
    warm.set_params(lr=2e-3).fit(X, y)
    losses = warm.history_[:, "train_loss"]
    assert len(losses) == 10 and losses[:5] == first  # the history goes on
    # The sixth epoch starts where the fifth ended, not from a new random head.
    assert losses[5] < 0.5 * losses[0] and losses[5] < losses[4] * 1.1
    assert warm.head_.optimizer_.param_groups[0]["lr"] == 2e-3  # this fit's settings apply
    # Without warm_start: anew (with AdamW and its weight decay of 1e-4, as warm_start=True trains).
    cold = PretrainedImageClassifier(max_epochs=5, lr=1e-3, optimizer=torch.optim.AdamW, weight_decay=1e-4,
                                     random_state=0).fit(X, y).fit(X, y)
    assert len(cold.history_) == 5 and cold.history_[:, "train_loss"] == first


def test_warm_start_refuses_what_the_head_cannot_continue(flowers_split):
    X, y, _, _ = flowers_split
    clf = PretrainedImageClassifier(max_epochs=2, warm_start=True, random_state=0).fit(X, y)
    before = clf.head_
    with pytest.raises(ValueError, match="same classes|classes of the previous fit"):
        clf.fit(X[:20], y[:20])  # only daisy and sunflower
    with pytest.raises(ValueError, match="hidden_units"):
        clf.set_params(hidden_units=(16,)).fit(X, y)
    clf.set_params(hidden_units=())
    with pytest.raises(ValueError, match="other features"):
        clf.set_params(weights=None).fit(X, y)  # randomly initialised backbone
    assert clf.head_ is before  # a refused fit leaves the model as it was


def test_partial_fit_learns_from_batches_arriving_over_time(flowers_split):
    X, y, X_test, y_test = flowers_split
    classes = np.unique(y)
    clf = PretrainedImageClassifier(random_state=0)
    with pytest.raises(ValueError, match="classes is required on the first call") as caught:
        clf.partial_fit(X[:10], y[:10])
    # The example names this batch's own labels, not some other data set's.
    assert f"classes={sorted(set(y[:10].tolist()))!r}" in str(caught.value)
    daisies = PretrainedImageClassifier(random_state=0).partial_fit(X[:10], y[:10], classes=classes)
    assert daisies.classes_.tolist() == classes.tolist() and daisies.predict_proba(X_test).shape == (15, 3)
    # The first batch also fixes the features' standardisation, so it should be a fair mix.
    batches = np.array_split(np.random.default_rng(0).permutation(len(X)), 3)
    clf.partial_fit([X[i] for i in batches[0]], y[batches[0]], classes=classes)
    for _ in range(10):
        for idx in batches:
            clf.partial_fit([X[i] for i in idx], y[idx])
    assert len(clf.history_) == 31  # one epoch per call
    assert clf.score(X_test, y_test) > 0.6  # on photos it never saw (chance: 1/3)


def test_partial_fit_survives_a_pickle_and_checks_each_batch(tmp_path, flowers_split):
    X, y, _, _ = flowers_split
    clf = PretrainedImageClassifier(random_state=0).partial_fit(X[::2], y[::2], classes=np.unique(y))
    joblib.dump(clf, tmp_path / "model.joblib")
    loaded = joblib.load(tmp_path / "model.joblib").partial_fit(X[1::2], y[1::2])
    assert len(loaded.history_) == 2
    np.testing.assert_array_equal(loaded.history_[0, "train_loss"], clf.history_[0, "train_loss"])
    classes = ", ".join(map(repr, np.unique(y).tolist()))
    with pytest.raises(ValueError, match=re.escape(f"y has labels not in classes: 'rose'; the classes are [{classes}].")):
        loaded.partial_fit(X[:2], ["daisy", "rose"])  # plain names, not numpy's reprs
    with pytest.raises(ValueError, match="cannot change between calls"):
        loaded.partial_fit(X[:2], y[:2], classes=["daisy", "rose", "tulip"])
    with pytest.raises(ValueError, match="early_stopping"):
        PretrainedImageClassifier(early_stopping=True).partial_fit(X, y, classes=np.unique(y))
    # The temperature too is fitted on held-out images: each batch would lose them, and a batch
    # without some class could not be split.
    with pytest.raises(ValueError, match="^calibration='temperature' holds out part of the training data"):
        PretrainedImageClassifier(calibration="temperature").partial_fit(X, y, classes=np.unique(y))
    with pytest.raises(ValueError, match="balanced"):
        PretrainedImageClassifier(class_weight="balanced").partial_fit(X, y, classes=np.unique(y))


def test_regressor_and_multilabel_partial_fit(flowers_split):
    X, y, _, _ = flowers_split
    target = (y == "sunflower").astype(float) * 10 + 1
    reg = PretrainedImageRegressor(random_state=0)
    for _ in range(15):
        reg.partial_fit(X[::2], target[::2]).partial_fit(X[1::2], target[1::2])
    assert reg.n_outputs_ == 1 and len(reg.history_) == 30
    assert reg.score(X, target) > 0.8
    with pytest.raises(ValueError, match="predicts 1 output"):
        reg.partial_fit(X[:4], np.ones((4, 2)))
    Y = np.column_stack([y == "sunflower", y != "tulip"]).astype(int)
    clf = PretrainedImageClassifier(random_state=0)
    for _ in range(10):
        clf.partial_fit(X, Y)  # the labels are the columns: no classes needed
    assert clf.multilabel_ and clf.score(X, Y) > 0.8


def test_warm_start_refuses_another_unfreeze(flowers_split):
    X, y, _, _ = flowers_split
    clf = PretrainedImageClassifier(max_epochs=2, warm_start=True, random_state=0).fit(X, y)
    before = clf.predict_proba(X[:3])
    with pytest.raises(ValueError, match="unfreeze=1 now"):
        clf.set_params(unfreeze=1).fit(X, y)
    np.testing.assert_array_equal(clf.predict_proba(X[:3]), before)  # the model is as it was
