"""The scikit-learn estimator contract, for all three estimators, whose X is images.

``check_estimator`` feeds numeric 2-D arrays, so it runs here only the
individual sklearn checks that need no data; the checks that fit (clone of
a fitted model, idempotence, pickling, parameters untouched by fit, the
fitted state) are written out below with image paths.
"""

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils import estimator_checks as checks

from sktransfer import ImageEmbedder, PretrainedImageClassifier, PretrainedImageRegressor

ESTIMATORS = [PretrainedImageClassifier, PretrainedImageRegressor, ImageEmbedder]
WITH_HEAD = [PretrainedImageClassifier, PretrainedImageRegressor]

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


def _name(cls):
    return cls.__name__


@pytest.mark.parametrize("cls", ESTIMATORS, ids=_name)
@pytest.mark.parametrize("check", NO_DATA_CHECKS)
def test_sklearn_checks_that_need_no_data(cls, check):
    getattr(checks, check)(cls.__name__, cls())


@pytest.mark.parametrize("cls", ESTIMATORS, ids=_name)
def test_init_and_set_params_never_raise(cls):
    checks.check_do_not_raise_errors_in_init_or_set_params(cls.__name__, cls())


@pytest.mark.parametrize("cls", WITH_HEAD, ids=_name)
def test_init_only_stores_parameters_routed_ones_included(cls):
    est = cls(lr=0.01, optimizer__betas=(0.8, 0.9), iterator_train__drop_last=True)
    assert vars(est) == est.get_params(deep=False)
    twin = cls().set_params(**est.get_params())
    assert twin.get_params() == est.get_params()
    assert clone(est).get_params() == est.get_params()


@pytest.fixture(scope="module")
def data(sample):
    paths, labels = sample
    keep = list(range(5)) + list(range(30, 35))
    return [paths[i] for i in keep], labels[keep]


def _target(cls, y):
    """Class labels for the classifier, a number per image for the regressor."""
    return y if cls is PretrainedImageClassifier else (y == y[0]).astype(float) * 2.0 - 0.5


def _fitted(cls, X, y, **params):
    if cls is ImageEmbedder:
        return ImageEmbedder().fit(X)
    return cls(max_epochs=2, random_state=0, **params).fit(X, _target(cls, y))


def _output(est, X):
    """What a user reads from a fitted estimator: probabilities, predictions or features."""
    if isinstance(est, PretrainedImageClassifier):
        return est.predict_proba(X)
    return est.predict(X) if isinstance(est, PretrainedImageRegressor) else est.transform(X)


def test_fit_is_idempotent_and_leaves_parameters_alone(data, sample):
    X, y = data
    clf = PretrainedImageClassifier(hidden_units=(8,), dropout=0.1, max_epochs=4, random_state=0)
    params = clf.get_params()
    first = clf.fit(X, y).predict_proba(X)
    assert clf.get_params() == params  # fit does not change parameters
    other_X = [sample[0][i] for i in (60, 61, 62, 90, 91, 92)]
    clf.fit(other_X, sample[1][[60, 61, 62, 90, 91, 92]])  # fitted on other data in between
    assert clf.classes_.tolist() == ["rose", "sunflower"]
    np.testing.assert_array_equal(clf.fit(X, y).predict_proba(X), first)
    assert clf.classes_.tolist() == ["daisy", "dandelion"]


def test_regressor_fit_is_idempotent_and_leaves_parameters_alone(data):
    X, y = data
    reg = PretrainedImageRegressor(hidden_units=(8,), max_epochs=3, random_state=0)
    params = reg.get_params()
    first = reg.fit(X, _target(PretrainedImageRegressor, y)).predict(X)
    assert reg.get_params() == params
    reg.fit(X[:6], np.arange(12.0).reshape(6, 2))  # two outputs in between
    assert reg.n_outputs_ == 2
    np.testing.assert_array_equal(reg.fit(X, _target(PretrainedImageRegressor, y)).predict(X), first)
    assert reg.n_outputs_ == 1


def test_embedder_fit_is_idempotent(data):
    X, _ = data
    embedder = ImageEmbedder()
    first = embedder.fit(X).transform(X[:3])
    np.testing.assert_array_equal(embedder.fit(X).transform(X[:3]), first)
    assert embedder.get_params() == ImageEmbedder().get_params()


@pytest.mark.parametrize("cls", ESTIMATORS, ids=_name)
def test_fitted_state_is_the_listed_attributes(cls, data):
    X, y = data
    est = _fitted(cls, X, y)
    fitted = set(cls._fitted_attributes)
    assert fitted <= set(vars(est))  # fit sets every listed attribute ...
    # ... and nothing else but its parameters (sklearn's optional feature_names_in_ aside).
    assert set(vars(est)) - set(est.get_params(deep=False)) - {"feature_names_in_"} == fitted
    twin = clone(est)
    assert not fitted & set(vars(twin))  # a clone is unfitted
    assert twin.get_params() == est.get_params()
    with pytest.raises(Exception, match="not fitted"):
        _output(twin, X[:1])


@pytest.mark.parametrize("cls", ESTIMATORS, ids=_name)
def test_pickle_round_trip_keeps_the_fitted_state_and_output(cls, data):
    X, y = data
    est = _fitted(cls, X, y)
    again = pickle.loads(pickle.dumps(est))
    assert set(type(est)._fitted_attributes) <= set(vars(again))
    assert again.get_params().keys() == est.get_params().keys()
    np.testing.assert_array_equal(_output(again, X), _output(est, X))


@pytest.mark.parametrize("cls", ESTIMATORS, ids=_name)
def test_pickle_missing_part_of_the_fitted_state_is_refused(cls, data):
    X, y = data
    est = _fitted(cls, X, y)
    missing = cls._fitted_attributes[-1]
    delattr(est, missing)
    with pytest.raises(RuntimeError, match=f"{cls.__name__}.*{missing}"):
        pickle.loads(pickle.dumps(est))
    pickle.loads(pickle.dumps(clone(est)))  # an unfitted estimator has no fitted state to miss


def test_prediction_leaves_the_fitted_head_untouched(data):
    # Predicting only reads the model: concurrent predictions share it safely.
    X, y = data
    for cls in WITH_HEAD:
        est = _fitted(cls, X, y)
        before = dict(vars(est.head_))
        _output(est, X[:2])
        assert all(vars(est.head_)[k] is v for k, v in before.items()), cls.__name__
        assert vars(est.head_).keys() == before.keys()


def test_embedder_records_one_input_column_with_or_without_X(data):
    X, _ = data
    assert ImageEmbedder().fit().n_features_in_ == 1  # images are one column, given or not
    pd = pytest.importorskip("pandas")
    embedder = ImageEmbedder().fit(pd.DataFrame({"image": X}))
    assert embedder.n_features_in_ == 1 and embedder.feature_names_in_.tolist() == ["image"]
    assert not hasattr(embedder.fit(), "feature_names_in_")  # refitting without X forgets them


def test_embedder_tags_say_features_are_float32_whatever_the_input(data):
    X, _ = data
    embedder = ImageEmbedder().fit()
    tags = embedder.__sklearn_tags__()
    # Images are not numeric arrays whose dtype could carry over: no input dtype is preserved.
    assert tags.transformer_tags.preserves_dtype == []
    images = np.stack([np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 200, np.uint8)])
    for batch in (X[:2], list(images)):
        assert embedder.transform(batch).dtype == np.float32
