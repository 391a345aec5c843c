"""The scikit-learn estimator contract for estimators whose X is image paths.

``check_estimator`` feeds numeric 2-D arrays, so it runs here only the
individual sklearn checks that need no data; the checks that fit (clone of
a fitted model, idempotence, pickling, parameters untouched by fit) are
written out below with image paths.
"""

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils import estimator_checks as checks

from sktransfer import ImageEmbedder, PretrainedImageClassifier

NO_DATA_CHECKS = [
    "check_no_attributes_set_in_init",
    "check_get_params_invariance",
    "check_set_params",
    "check_parameters_default_constructible",
    "check_estimator_repr",
    "check_estimator_cloneable",
    "check_estimator_tags_renamed",
    "check_valid_tag_types",
    "check_mixin_order",
]


@pytest.mark.parametrize("estimator", [PretrainedImageClassifier(), ImageEmbedder()], ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("check", NO_DATA_CHECKS)
def test_sklearn_checks_that_need_no_data(estimator, check):
    getattr(checks, check)(type(estimator).__name__, estimator)


def test_embedder_init_and_set_params_never_raise():
    # For the classifier this sklearn check passes a parameter literally named
    # "kwargs" (from **kwargs), which is rejected on purpose: skorch settings
    # need a prefix. The equivalent for the classifier is the next test.
    checks.check_do_not_raise_errors_in_init_or_set_params("ImageEmbedder", ImageEmbedder())


def test_init_only_stores_parameters_routed_ones_included():
    clf = PretrainedImageClassifier(lr=0.01, optimizer__betas=(0.8, 0.9), iterator_train__drop_last=True)
    assert vars(clf) == clf.get_params(deep=False)
    twin = PretrainedImageClassifier().set_params(**clf.get_params())
    assert twin.get_params() == clf.get_params()
    assert clone(clf).get_params() == clf.get_params()


@pytest.fixture(scope="module")
def data(sample):
    paths, labels = sample
    keep = list(range(5)) + list(range(30, 35))
    return [paths[i] for i in keep], labels[keep]


def test_fit_is_idempotent_and_leaves_parameters_alone(data, sample):
    X, y = data
    clf = PretrainedImageClassifier(hidden_units=(8,), dropout=0.1, max_epochs=4, random_state=0)
    params = clf.get_params()
    first = clf.fit(X, y).predict_proba(X)
    assert clf.get_params() == params  # fit does not change parameters
    other_X = [sample[0][i] for i in (60, 61, 62, 90, 91, 92)]
    clf.fit(other_X, sample[1][[60, 61, 62, 90, 91, 92]])  # fitted on other data in between
    assert clf.classes_.tolist() == ["metal", "paper"]
    np.testing.assert_array_equal(clf.fit(X, y).predict_proba(X), first)
    assert clf.classes_.tolist() == ["cardboard", "glass"]


def test_clone_of_a_fitted_model_is_unfitted(data):
    X, y = data
    clf = PretrainedImageClassifier(max_epochs=2, random_state=0).fit(X, y)
    twin = clone(clf)
    assert not any(k.endswith("_") and not k.startswith("_") for k in vars(twin))
    assert twin.get_params() == clf.get_params()


def test_pickle_round_trip_predicts_the_same(data):
    X, y = data
    clf = PretrainedImageClassifier(max_epochs=2, random_state=0).fit(X, y)
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(again.predict_proba(X), clf.predict_proba(X))
    assert again.get_params().keys() == clf.get_params().keys()
    embedder = ImageEmbedder().fit()
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(embedder)).transform(X[:2]), embedder.transform(X[:2]))


def test_embedder_fit_is_idempotent(data):
    X, _ = data
    embedder = ImageEmbedder()
    first = embedder.fit(X).transform(X[:3])
    np.testing.assert_array_equal(embedder.fit(X).transform(X[:3]), first)
    assert embedder.get_params() == ImageEmbedder().get_params()
