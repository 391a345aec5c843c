"""Multi-label classification on real flower photos: labels derived from the species."""

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, classification_report, f1_score
from sklearn.model_selection import KFold, cross_validate
from sklearn.preprocessing import MultiLabelBinarizer

from sktransfer import PretrainedImageClassifier

from conftest import dataset, subset

FAST = dict(max_epochs=30, random_state=0)
LABELS = ["yellow", "radial", "cup_shaped"]
TRAITS = {  # what a gardener would tag each species with; every photo gets at least one label
    "daisy": {"radial"},
    "dandelion": {"yellow", "radial"},
    "rose": {"cup_shaped"},
    "sunflower": {"yellow", "radial"},
    "tulip": {"cup_shaped"},
}


def indicator(species):
    return MultiLabelBinarizer(classes=LABELS).fit_transform([TRAITS[s] for s in species])


@pytest.fixture(scope="module")
def flowers_split():
    folder = dataset("flowers5")
    train, s_train = subset(folder, 6)
    test, s_test = subset(folder, 4, offset=6)
    return train, indicator(s_train), test, indicator(s_test)


def test_indicator_y_trains_one_sigmoid_per_label(flowers_split):
    train, Y_train, test, Y_test = flowers_split
    clf = PretrainedImageClassifier(**FAST).fit(train, Y_train)
    assert clf.multilabel_ and clf.classes_.tolist() == [0, 1, 2]
    assert isinstance(clf.head_.criterion_, torch.nn.BCEWithLogitsLoss)
    assert isinstance(clf.head_.optimizer_, torch.optim.AdamW)  # weight_decay="auto" tunes single-label heads only
    proba = clf.predict_proba(test)
    assert proba.shape == (20, 3) and ((proba >= 0) & (proba <= 1)).all()
    assert not np.allclose(proba.sum(axis=1), 1)  # independent labels, not a softmax
    pred = clf.predict(test)
    assert pred.shape == (20, 3) and pred.dtype.kind == "i" and set(np.unique(pred)) <= {0, 1}
    np.testing.assert_array_equal(pred, (proba > 0.5).astype(int))
    assert clf.score(test, Y_test) == accuracy_score(Y_test, pred)  # subset accuracy
    assert f1_score(Y_test, pred, average="samples") > 0.6


def test_sklearn_multilabel_metrics_and_cross_validation(flowers_split):
    train, Y_train, test, Y_test = flowers_split
    clf = PretrainedImageClassifier(**FAST).fit(train, Y_train)
    report = classification_report(Y_test, clf.predict(test), target_names=LABELS, output_dict=True,
                                   zero_division=0)
    assert set(LABELS) <= set(report) and "samples avg" in report
    cv = KFold(3, shuffle=True, random_state=0)  # folds mix the species
    scores = cross_validate(PretrainedImageClassifier(**FAST), train, Y_train, cv=cv,
                            scoring=["f1_samples", "accuracy"])
    assert scores["test_f1_samples"].mean() > 0.5


def test_sparse_indicator_and_early_stopping(flowers_split):
    train, Y_train, test, _ = flowers_split
    _, species = subset(dataset("flowers5"), 6)
    sparse_Y = MultiLabelBinarizer(classes=LABELS, sparse_output=True).fit_transform([TRAITS[s] for s in species])
    dense = PretrainedImageClassifier(**FAST).fit(train, Y_train)
    sparse = PretrainedImageClassifier(**FAST).fit(train, sparse_Y)
    np.testing.assert_array_equal(dense.predict_proba(test), sparse.predict_proba(test))
    stopped = PretrainedImageClassifier(early_stopping=True, validation_fraction=0.2, n_iter_no_change=2,
                                        max_epochs=200, lr=0.05, random_state=0).fit(train, Y_train)
    assert "valid_loss" in stopped.history_[0] and len(stopped.history_) < 200
    assert 0 <= stopped.history_[-1, "valid_acc"] <= 1  # subset accuracy of the held-out photos


def test_multilabel_errors_name_the_problem(flowers_split):
    train, Y_train, test, _ = flowers_split
    with pytest.raises(ValueError, match="not a 0/1 indicator matrix"):
        PretrainedImageClassifier(**FAST).fit(train, Y_train * 2)
    with pytest.raises(ValueError, match="not a 0/1 indicator matrix"):
        PretrainedImageClassifier(**FAST).fit(train, np.where(Y_train == 1, "yes", "no"))
    with pytest.raises(ValueError, match="class_weight"):
        PretrainedImageClassifier(class_weight="balanced", **FAST).fit(train, Y_train)
    with pytest.raises(ValueError, match="30 images but y has 29 rows"):
        PretrainedImageClassifier(**FAST).fit(train, Y_train[:-1])
    clf = PretrainedImageClassifier(max_epochs=2).fit(train, Y_train)
    with pytest.raises(ValueError, match="3 columns"):
        clf.score(test, Y_train[:20, :2])
