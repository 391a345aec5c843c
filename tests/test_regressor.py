"""PretrainedImageRegressor on real photos: brightness of flowers, sign-digit index as a number."""

import numpy as np
import pytest
from PIL import Image
from sklearn.base import clone, is_regressor
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score

from sktransfer import PretrainedImageClassifier, PretrainedImageRegressor, clear_cache
from sktransfer._backbones import build_backbone

from conftest import ForwardCounter, assert_same_in_fresh_process, dataset, subset

FAST = dict(max_epochs=30, random_state=0)


def brightness(paths):
    """Mean grey level (0-255) of each photo: a target anyone can recompute."""
    return np.array([np.asarray(Image.open(p).convert("L"), dtype=np.float64).mean() for p in paths])


def redness(paths):
    """Mean red minus mean green of each photo."""
    rgb = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in paths]
    return np.array([a[..., 0].mean() - a[..., 1].mean() for a in rgb])


@pytest.fixture(scope="module")
def flowers_split():
    """Disjoint train/test photos of all five flower classes."""
    folder = dataset("flowers5")
    train, _ = subset(folder, 6)
    test, _ = subset(folder, 4, offset=6)
    return train, test


@pytest.fixture(scope="module")
def digits_split():
    """Sign-language photos of the digits 0, 2, 4, 6, 8: disjoint train/test photos."""
    folder = dataset("sign_digits")
    digits = [str(d) for d in range(0, 10, 2)]
    train, y_train = subset(folder, 6, digits)
    test, y_test = subset(folder, 4, digits, offset=6)
    return train, y_train.astype(float), test, y_test.astype(float)


def test_digit_as_a_number_generalises_to_unseen_photos(digits_split):
    train, y_train, test, y_test = digits_split
    reg = PretrainedImageRegressor(**FAST).fit(train, y_train)
    assert is_regressor(reg) and reg.n_outputs_ == 1
    pred = reg.predict(test)
    assert pred.shape == (20,) and pred.dtype == np.float64
    assert reg.score(test, y_test) == pytest.approx(r2_score(y_test, pred))
    assert reg.score(test, y_test) > 0.4  # far better than predicting the mean (R² = 0)
    assert 2 <= len(reg.history_) <= 30  # L-BFGS steps from the tuned start, until one no longer lowers the loss


def test_multi_output_targets(flowers_split):
    train, test = flowers_split
    Y_train = np.column_stack([brightness(train), redness(train)])
    reg = PretrainedImageRegressor(**FAST).fit(train, Y_train)
    pred = reg.predict(test)
    assert reg.n_outputs_ == 2 and pred.shape == (20, 2)
    # Both outputs are learned (on these 30 photos; brightness is not a semantic
    # feature, so 30 photos are too few for it to carry over to new ones).
    assert reg.score(train, Y_train) == pytest.approx(r2_score(Y_train, reg.predict(train)))
    assert r2_score(Y_train, reg.predict(train), multioutput="raw_values").min() > 0.9
    single = PretrainedImageRegressor(**FAST).fit(train, Y_train[:, :1])  # a 2-D column stays 2-D
    assert single.predict(test).shape == (20, 1)


def test_target_scaling_makes_the_fit_independent_of_target_units(flowers_split):
    train, test = flowers_split
    y = brightness(train)
    a = PretrainedImageRegressor(**FAST).fit(train, y)
    b = PretrainedImageRegressor(**FAST).fit(train, 1000 * y + 7)  # the same target in other units
    np.testing.assert_allclose(b.predict(test), 1000 * a.predict(test) + 7, rtol=1e-5)
    assert b.target_mean_[0] == pytest.approx(1000 * y.mean() + 7)
    raw = PretrainedImageRegressor(target_scaling=False, **FAST).fit(train, y)
    assert raw.target_mean_.tolist() == [0.0] and raw.target_scale_.tolist() == [1.0]
    # Unscaled, the head starts near 0 while the targets are ~100: the loss is in grey levels squared.
    assert raw.history_[0, "train_loss"] > 100 * a.history_[0, "train_loss"]


def test_shares_embedder_and_cache_with_the_classifier(flowers_split):
    train, _ = flowers_split
    clear_cache()
    labels = np.array([p.split("/")[-2] for p in train])
    with ForwardCounter(build_backbone("efficientnet_lite0").module) as counter:
        reg = PretrainedImageRegressor(max_epochs=2).fit(train, brightness(train))
        clf = PretrainedImageClassifier(max_epochs=2).fit(train, labels)
        assert counter.images == len(train)  # the regressor's features served the classifier
    np.testing.assert_array_equal(reg.embedder_.transform(train), clf.embedder_.transform(train))


def test_sklearn_contract_and_errors(flowers_split):
    train, _ = flowers_split
    reg = PretrainedImageRegressor(lr=0.01, optimizer__betas=(0.8, 0.9), target_scaling=False)
    params = reg.get_params()
    assert params["optimizer__betas"] == (0.8, 0.9) and params["target_scaling"] is False
    assert clone(reg).get_params() == params
    assert "class_weight" not in params
    y = brightness(train)
    with pytest.raises(ValueError, match="30 images but y has 29"):
        reg.fit(train, y[:-1])
    with pytest.raises(ValueError, match="NaN"):
        reg.fit(train, np.where(np.arange(30) == 3, np.nan, y))
    with pytest.raises(ValueError, match="'target_scaling' parameter"):
        PretrainedImageRegressor(target_scaling="yes").fit(train, y)
    with pytest.raises(ValueError, match="y must hold numbers.*use PretrainedImageClassifier"):
        reg.fit(train, ["cat"] * 30)
    with pytest.raises(ValueError, match="requires y"):
        reg.fit(train)


@pytest.mark.slow
def test_grid_search_and_cross_validation(digits_split):
    train, y_train, _, _ = digits_split
    cv = KFold(3, shuffle=True, random_state=0)
    search = GridSearchCV(PretrainedImageRegressor(**FAST), {"hidden_units": [(), (64,)]}, cv=cv)
    search.fit(train, y_train)
    assert search.best_score_ == search.cv_results_["mean_test_score"].max()
    best = PretrainedImageRegressor(**FAST).set_params(**search.best_params_).fit(train, y_train)
    np.testing.assert_array_equal(search.predict(train), best.predict(train))
    scores = cross_val_score(PretrainedImageRegressor(**FAST), train, y_train, cv=cv)  # R² on held-out folds
    assert scores.mean() > 0.2


def test_pickle_predicts_the_same_in_a_fresh_process(tmp_path, flowers_split):
    train, test = flowers_split
    reg = PretrainedImageRegressor(**FAST).fit(train, np.column_stack([brightness(train), redness(train)]))
    assert_same_in_fresh_process(reg, test, tmp_path)
