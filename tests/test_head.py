"""Stage 5, the head: settings routed to skorch, the tuned linear head, calibration, batching."""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeCV
from sklearn.metrics import r2_score
from sklearn.utils.estimator_checks import check_do_not_raise_errors_in_init_or_set_params

from sktransfer import ImageEmbedder, PretrainedImageClassifier, PretrainedImageRegressor
from sktransfer._head import (
    L2_GRID,
    FeatureLoader,
    HeadModule,
    TemperatureScaling,
    feature_statistics,
    linear_loss,
    l2_penalty,
    pick_view,
    tune_l2,
    tune_ridge,
    unread_settings,
    weighted_loss,
)

ESTIMATORS = [ImageEmbedder, PretrainedImageClassifier, PretrainedImageRegressor]


@pytest.fixture(scope="module")
def halves(sample):
    """The bundled sample split in two halves (every other photo), and their features."""
    paths, labels = sample
    features = ImageEmbedder().fit_transform(paths)
    brightness = np.array([np.asarray(Image.open(p).convert("L")).mean() for p in paths])
    train, test = np.arange(0, len(paths), 2), np.arange(1, len(paths), 2)
    return paths, labels, features, brightness, train, test


def standardised(features, train):
    mean, scale = feature_statistics(features[train])
    return (features - mean) / scale


# -- weight_decay="auto" against a tuned linear model on the same features ---------------

@pytest.mark.filterwarnings("ignore::FutureWarning")  # LogisticRegressionCV's coming defaults
def test_auto_weight_decay_classifier_scores_at_least_logistic_regression_cv(halves):
    paths, labels, features, _, train, test = halves
    clf = PretrainedImageClassifier(weight_decay="auto", random_state=0).fit([paths[i] for i in train], labels[train])
    ours = clf.score([paths[i] for i in test], labels[test])
    Z = standardised(features, train)
    probe = LogisticRegressionCV(max_iter=2000).fit(Z[train], labels[train]).score(Z[test], labels[test])
    assert ours >= probe - 0.02, (ours, probe)


def test_auto_weight_decay_regressor_scores_at_least_ridge_cv(halves):
    paths, _, features, brightness, train, test = halves
    reg = PretrainedImageRegressor(weight_decay="auto", random_state=0).fit([paths[i] for i in train], brightness[train])
    ours = reg.score([paths[i] for i in test], brightness[test])
    Z = standardised(features, train)
    probe = r2_score(brightness[test], RidgeCV(alphas=np.logspace(-3, 4, 15)).fit(Z[train], brightness[train])
                     .predict(Z[test]))
    assert ours >= probe - 0.02, (ours, probe)


def test_default_weight_decay_tunes_a_full_batch_linear_head(halves):
    paths, labels, _, _, train, _ = halves
    X, y = [paths[i] for i in train], labels[train]
    clf = PretrainedImageClassifier(random_state=0).fit(X, y)
    assert clf.weight_decay == "auto" and isinstance(clf.head_.optimizer_, torch.optim.LBFGS) and clf.head_.l2 in L2_GRID
    # Still a skorch head: one L-BFGS step per epoch, until a step no longer lowers the loss
    # (the steps after it would start from the same point and repeat it).
    losses = clf.history_[:, "train_loss"]
    assert 2 <= len(losses) < clf.max_epochs and losses[-2] - losses[-1] <= 1e-7 < losses[0] - losses[1], losses
    assert dict(clf.head_.callbacks_)["converged"].converged_
    # Training starts from the tuned solution (each epoch's loss is that of its starting point),
    # far nearer the optimum than a zero start (loss log(n_classes)); the fitted head does not
    # keep that starting point.
    assert losses[0] - losses[-1] < 0.1 * (np.log(len(clf.classes_)) - losses[-1]), losses
    assert dict(clf.head_.callbacks_)["initial_weights"].weight is None
    again = PretrainedImageClassifier(weight_decay="auto", random_state=0).fit(X, y)
    np.testing.assert_array_equal(clf.predict_proba(X[:5]), again.predict_proba(X[:5]))
    # Unseeded, the tuning folds are fixed too (as LogisticRegressionCV's): a grid over what
    # this head does not read gives equal candidates, as the docs say.
    unseeded = [PretrainedImageClassifier().fit(X, y) for _ in range(3)]
    assert len({m.weight_decay_ for m in unseeded}) == 1
    np.testing.assert_array_equal(unseeded[0].predict_proba(X[:5]), unseeded[2].predict_proba(X[:5]))
    # Heads "auto" does not tune: AdamW with its usual decay.
    mlp = PretrainedImageClassifier(hidden_units=(16,), weight_decay="auto", max_epochs=2, random_state=0).fit(X, y)
    assert isinstance(mlp.head_.optimizer_, torch.optim.AdamW) and mlp.head_.l2 == 0.0
    assert mlp.head_.optimizer_.param_groups[0]["weight_decay"] == 1e-4
    # A head that will be trained further (warm_start) is AdamW's from the first fit on.
    warm = PretrainedImageClassifier(warm_start=True, max_epochs=2, random_state=0).fit(X, y)
    assert isinstance(warm.head_.optimizer_, torch.optim.AdamW)
    # A number is the optimizer's weight decay; for L-BFGS, which has none, the loss's L2 penalty.
    fixed = PretrainedImageClassifier(optimizer=torch.optim.LBFGS, weight_decay=0.5, max_epochs=2).fit(X, y)
    assert fixed.head_.l2 == 0.5
    # Dropout makes every evaluation of the loss another one, which L-BFGS's line search cannot
    # follow: a linear head with dropout is trained by AdamW, in mini-batches.
    for settings in ({"dropout": 0.5}, {"module__dropout": 0.5}):
        dropped = PretrainedImageClassifier(max_epochs=2, random_state=0, **settings).fit(X, y)
        assert isinstance(dropped.head_.optimizer_, torch.optim.AdamW)


def test_a_number_for_weight_decay_fits_the_linear_head_at_that_l2_strength(halves):
    # The head's loss is the mean over images plus weight_decay / 2 times the squared weights:
    # LogisticRegression's at C = 1 / (weight_decay * n_images), on the standardised features. So a
    # grid over weight_decay walks a regularisation path, as LogisticRegressionCV's grid over C does.
    paths, labels, features, _, train, test = halves
    X, y = [paths[i] for i in train], labels[train]
    Z = standardised(features, train)
    for weight_decay in (0.3, 0.01):
        clf = PretrainedImageClassifier(weight_decay=weight_decay, random_state=0).fit(X, y)
        assert isinstance(clf.head_.optimizer_, torch.optim.LBFGS) and clf.head_.l2 == weight_decay
        assert "initial_weights" not in dict(clf.head_.callbacks_)  # nothing tuned: the fit starts at zero
        probe = LogisticRegression(C=1 / (weight_decay * len(train)), tol=1e-10, max_iter=10_000).fit(Z[train], y)
        # Within L-BFGS's float32 tolerances (2.4e-3 here at most; C off by a factor of 2 moves them by 3e-2 or more).
        np.testing.assert_allclose(clf.predict_proba([paths[i] for i in test]), probe.predict_proba(Z[test]),
                                   atol=5e-3)


def test_for_two_classes_the_l2_strength_is_logistic_regression_at_twice_the_c(halves):
    # Two logits, both penalised: at the optimum they are opposite, w and -w, so the one
    # weight vector of scikit-learn's binary model is 2w and the penalty weight_decay * |w|^2
    # is weight_decay / 4 times its square: C = 2 / (weight_decay * n_images).
    paths, labels, features, _, train, test = halves
    two = np.unique(labels)[:2]
    train, test = train[np.isin(labels[train], two)], test[np.isin(labels[test], two)]
    Z = standardised(features, train)
    for weight_decay in (1.0, 0.03):
        clf = PretrainedImageClassifier(weight_decay=weight_decay, random_state=0).fit(
            [paths[i] for i in train], labels[train])
        expected = LogisticRegression(C=2 / (weight_decay * len(train)), tol=1e-10, max_iter=10_000).fit(
            Z[train], labels[train]).predict_proba(Z[test])
        np.testing.assert_allclose(clf.predict_proba([paths[i] for i in test]), expected, atol=5e-3)


def test_a_number_for_the_regressors_weight_decay_is_ridge_at_the_matching_alpha(halves):
    # The regressor's loss (mean over images of the squared error, plus weight_decay / 2 times the
    # squared weights) is Ridge's objective at alpha = weight_decay * n_images * n_outputs / 2,
    # on standardised features and targets.
    from sklearn.linear_model import Ridge

    paths, _, features, brightness, train, test = halves
    Z = standardised(features, train)
    target = (brightness[train] - brightness[train].mean()) / brightness[train].std()
    for weight_decay in (1.0, 0.03):
        reg = PretrainedImageRegressor(weight_decay=weight_decay, random_state=0).fit(
            [paths[i] for i in train], brightness[train])
        assert reg.head_.l2 == weight_decay
        ridge = Ridge(alpha=weight_decay * len(train) / 2).fit(Z[train], target)
        expected = ridge.predict(Z[test]) * brightness[train].std() + brightness[train].mean()
        np.testing.assert_allclose(reg.predict([paths[i] for i in test]), expected, rtol=1e-3, atol=0.05)


def test_settings_the_full_batch_head_never_reads_are_warned_about(halves):
    # As scikit-learn warns of a setting its solver ignores: a grid over lr or batch_size for the
    # default head would give equal candidates.
    import warnings

    paths, labels, _, _, train, _ = halves
    X, y = [paths[i] for i in train][:30], labels[train][:30]
    with pytest.warns(UserWarning, match=r"lr=0.01 and batch_size=8 are not used by this fit: the linear head "
                                         r"is fitted full batch by L-BFGS"):
        PretrainedImageClassifier(lr=0.01, batch_size=8, random_state=0).fit(X, y)
    with pytest.warns(UserWarning, match=r"^lr=0.01 is not used"):
        PretrainedImageRegressor(lr=0.01, random_state=0).fit(X, np.arange(len(X), dtype=float))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        PretrainedImageClassifier(weight_decay=0.1, random_state=0).fit(X, y)  # defaults: nothing to say
        PretrainedImageClassifier(lr=0.01, hidden_units=(8,), max_epochs=1, random_state=0).fit(X, y)  # AdamW reads it


def test_drop_last_is_not_read_by_the_full_batch_head(halves):
    # The full-batch head's one batch is every image; with images held out for early stopping it
    # is smaller than its batch_size, and drop_last used to drop it: no training step at all, and
    # skorch's KeyError for a train_loss never recorded.
    paths, labels, _, _, train, _ = halves
    X, y = [paths[i] for i in train], labels[train]
    with pytest.warns(UserWarning, match=r"^iterator_train__drop_last=True is not used by this fit"):
        clf = PretrainedImageClassifier(early_stopping=True, validation_fraction=0.25, iterator_train__drop_last=True,
                                        random_state=0).fit(X, y)
    assert all(np.isfinite(clf.history_[:, "train_loss"])) and clf.history_[-1, "batches"][0]["train_batch_size"] > 0
    # Heads trained in mini-batches read it.
    PretrainedImageClassifier(hidden_units=(8,), max_epochs=1, iterator_train__drop_last=True,
                              random_state=0).fit(X, y)


def test_iterator_train_batch_size_is_not_read_by_the_full_batch_head(halves):
    # It used to reach the loader and split the one batch, without a word: L-BFGS on another
    # mini-batch at every evaluation, which its line search cannot follow, and a ruined fit.
    paths, labels, _, _, train, test = halves
    X, y, held_out = [paths[i] for i in train], labels[train], [paths[i] for i in test]
    with pytest.warns(UserWarning, match=r"^iterator_train__batch_size=4 is not used by this fit"):
        clf = PretrainedImageClassifier(iterator_train__batch_size=4, random_state=0).fit(X, y)
    assert isinstance(clf.head_.optimizer_, torch.optim.LBFGS)
    assert all(len(epoch["batches"]) == 1 for epoch in clf.history_)
    default = PretrainedImageClassifier(random_state=0).fit(X, y)
    np.testing.assert_allclose(clf.predict_proba(held_out), default.predict_proba(held_out), atol=1e-6)
    # The command line asks the same function which settings to name.
    defaults = PretrainedImageClassifier().get_params()
    assert unread_settings(defaults, defaults, {"iterator_train__batch_size": 4}) == {"iterator_train__batch_size": 4}
    # Heads trained in mini-batches read it.
    mlp = PretrainedImageClassifier(hidden_units=(8,), max_epochs=1, iterator_train__batch_size=4,
                                    random_state=0).fit(X, y)
    assert len(mlp.history_[-1]["batches"]) == -(-len(X) // 4)


@pytest.mark.parametrize("task", ["classes", "targets"])
def test_linear_loss_is_autograds_loss_and_gradient_through_the_head_module(halves, task):
    # The full-batch linear head evaluates its loss from the raw features with the standardisation
    # folded into the weights: the same value and gradient as the module's forward and backward.
    _, labels, features, brightness, _, _ = halves
    torch.manual_seed(0)
    X = torch.as_tensor(features)
    mean, scale = feature_statistics(features)
    weights = torch.as_tensor(np.where(np.arange(len(X)) % 3 == 0, 2.0, 1.0), dtype=torch.float32)
    if task == "classes":
        y, k, criterion = torch.as_tensor(np.unique(labels, return_inverse=True)[1]), 6, torch.nn.CrossEntropyLoss
    else:
        y, k, criterion = torch.as_tensor(np.column_stack([brightness, -brightness]) / 100, dtype=torch.float32), 2, \
            torch.nn.MSELoss
    criterion = criterion(reduction="none")
    module = HeadModule(X.shape[1], k, mean=mean, scale=scale)
    expected = weighted_loss(criterion, module(X), y, weights) + 0.3 * l2_penalty(module)
    expected.backward()
    layer = module.layers[-1]
    grads = layer.weight.grad.clone(), layer.bias.grad.clone()
    layer.zero_grad()
    loss, logits = linear_loss(layer, X, lambda z: weighted_loss(criterion, z, y, weights), 0.3, module.mean,
                               module.scale)
    np.testing.assert_allclose(float(loss), float(expected.detach()), rtol=1e-5)
    np.testing.assert_allclose(logits, module(X).detach(), rtol=1e-4, atol=1e-4)
    for got, want in zip((layer.weight.grad, layer.bias.grad), grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n_targets, weighted", [(1, False), (2, True)])
def test_auto_weight_decay_regressor_is_ridge_cv_on_the_strengths_of_the_grid(halves, n_targets, weighted):
    # Squared error has an exact leave-one-out error in closed form: the regressor's strength is
    # RidgeCV's on the same grid (alpha = l2 * total weight * outputs / 2).
    paths, _, features, brightness, train, test = halves
    Y = np.column_stack([brightness, np.arange(len(paths)) % 7])[:, :n_targets]
    weights = np.where(np.arange(len(paths)) % 3 == 0, 2.0, 1.0) if weighted else np.ones(len(paths))
    reg = PretrainedImageRegressor(random_state=0).fit([paths[i] for i in train], Y[train].squeeze(),
                                                       sample_weight=weights[train])
    Z = standardised(features, train)
    target = (Y[train] - Y[train].mean(axis=0)) / Y[train].std(axis=0)
    factor = weights[train].sum() * n_targets / 2
    ridge = RidgeCV(alphas=np.array(L2_GRID) * factor).fit(Z[train], target, sample_weight=weights[train])
    assert reg.head_.l2 == pytest.approx(ridge.alpha_ / factor)
    expected = ridge.predict(Z[test]) * Y[train].std(axis=0) + Y[train].mean(axis=0)
    np.testing.assert_allclose(reg.predict([paths[i] for i in test]).reshape(expected.shape), expected,
                               rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    # The final fit started at that solution: its first loss is already the optimum's.
    losses = [epoch["train_loss"] for epoch in reg.head_.history]
    assert losses[0] == pytest.approx(losses[-1], rel=1e-4)


def test_tune_ridge_returns_the_minimiser_of_the_heads_own_penalised_loss(halves):
    paths, _, features, brightness, train, _ = halves
    redness = np.array([np.asarray(Image.open(p).convert("RGB"))[..., 0].mean() for p in paths])
    X = standardised(features, train)[train]
    Y = np.column_stack([brightness, redness])[train]
    Y = (Y - Y.mean(axis=0)) / Y.std(axis=0)
    weights = np.where(np.arange(len(train)) % 3 == 0, 3.0, 1.0)
    l2, weight, bias = tune_ridge(X, Y, weights)
    assert min(L2_GRID) < l2 < max(L2_GRID)  # chosen inside the grid, so a wrong scale would move it
    # The head's objective (weighted mean over images of the mean squared error over outputs,
    # plus l2/2 times the squared weights) has zero gradient at the returned solution.
    W = weight.double().clone().requires_grad_(True)
    b = bias.double().clone().requires_grad_(True)
    X64, Y64, w64 = (torch.as_tensor(a, dtype=torch.float64) for a in (X, Y, weights))
    criterion = torch.nn.MSELoss(reduction="none")
    loss = weighted_loss(criterion, X64 @ W.T + b, Y64, w64) + l2 * 0.5 * W.pow(2).sum()
    loss.backward()
    assert float(W.grad.abs().max()) < 1e-4 * float(W.detach().abs().max()) and float(b.grad.abs().max()) < 1e-4
    # Two images with weight leave the same error out at every strength: no choice to make.
    two = np.zeros(len(train))
    two[:2] = 1.0
    assert tune_ridge(X, Y, two) == (L2_GRID[len(L2_GRID) // 2], None, None)


def test_tune_l2_picks_the_strongest_penalty_for_labels_unrelated_to_the_photos(halves):
    _, labels, features, _, _, _ = halves
    from sklearn.model_selection import StratifiedKFold

    Z = standardised(features, np.arange(len(features))).astype(np.float32)
    criterion = torch.nn.CrossEntropyLoss(reduction="none")
    y = np.unique(labels, return_inverse=True)[1]
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(Z, y))
    shuffled = np.random.RandomState(0).permutation(y)
    weights = np.ones(len(y), np.float32)
    assert tune_l2(Z, shuffled, weights, criterion, len(np.unique(y)), folds)[0] == max(L2_GRID)
    l2, weight, bias = tune_l2(Z, y, weights, criterion, len(np.unique(y)), folds)
    assert l2 < max(L2_GRID) and weight.shape == (len(np.unique(y)), Z.shape[1]) and bias.shape == (len(np.unique(y)),)


# -- settings: stored in __init__, checked at fit, routed by skorch's prefixes ----------

@pytest.mark.parametrize("Estimator", ESTIMATORS, ids=lambda e: e.__name__)
def test_init_and_set_params_never_raise(Estimator):
    check_do_not_raise_errors_in_init_or_set_params(Estimator.__name__, Estimator())


@pytest.mark.parametrize("Estimator", ESTIMATORS[1:], ids=lambda e: e.__name__)
def test_set_params_refuses_unknown_names_at_once(Estimator, sample):
    """As scikit-learn's set_params does: a grid search with a misspelt name fails before any fit."""
    from sklearn.model_selection import GridSearchCV

    from sktransfer._backbones import build_backbone

    from conftest import ForwardCounter

    for key, hint in [("lrr", "did you mean 'lr'"), ("learning_rate", "did you mean 'lr'"),
                      ("hidden_layer_sizes", "did you mean 'hidden_units'"), ("max_epoch", "did you mean 'max_epochs'")]:
        with pytest.raises(ValueError, match=f"unexpected setting '{key}'; {hint}"):
            Estimator().set_params(**{key: 1})
    assert Estimator().set_params(optimizer__betas=(0.8, 0.9)).get_params()["optimizer__betas"] == (0.8, 0.9)
    paths, labels = sample
    for key in ("tta", "class_weight", "calibration"):  # a classifier's settings, not the regressor's
        with pytest.raises(ValueError, match=f"unexpected setting '{key}': it is a setting of "
                                             "PretrainedImageClassifier only"):
            PretrainedImageRegressor().set_params(**{key: "flip"})
    with pytest.raises(ValueError, match="'target_scaling': it is a setting of PretrainedImageRegressor only"):
        PretrainedImageClassifier(target_scaling=False).fit(paths[::30], labels[::30])
    with ForwardCounter(build_backbone("efficientnet_lite0").module) as counter:
        with pytest.raises(ValueError, match="unexpected setting 'lrr'"):
            GridSearchCV(PretrainedImageClassifier(), {"lrr": [0.1, 0.01]}, cv=2, error_score="raise").fit(
                paths[:8], labels[:8])
    assert counter.images == 0


def test_values_the_optimizer_or_criterion_refuse_are_told_before_any_image_is_embedded(sample):
    from sktransfer import clear_cache
    from sktransfer._backbones import build_backbone

    from conftest import ForwardCounter

    paths, labels = sample
    X, y = paths[:12:2] + paths[30:42:2], labels[list(range(0, 12, 2)) + list(range(30, 42, 2))]
    clear_cache()
    for Estimator, target, bad, message in [
        (PretrainedImageClassifier, y, dict(hidden_units=(8,), optimizer__betas=(1.5, 0.9)),
         r"optimizer__betas: AdamW refuses them: Invalid beta"),
        (PretrainedImageClassifier, y, dict(criterion__label_smoothing=2.0),
         "criterion__label_smoothing: CrossEntropyLoss refuses them"),
        (PretrainedImageClassifier, y, dict(criterion__weight=torch.ones(5)),  # 2 classes
         "criterion__weight: CrossEntropyLoss refuses them"),
        (PretrainedImageClassifier, y, dict(hidden_units=(8,), optimizer__foreach=True, optimizer__fused=True),
         "optimizer__foreach, optimizer__fused: AdamW refuses them: .*fused.* and .*foreach"),
    ]:
        with ForwardCounter(build_backbone("efficientnet_lite0").module) as counter:
            with pytest.raises(ValueError, match=message):
                Estimator(engine="torch", **bad).fit(X, target)
        assert counter.images == 0
    # Good values pass, and train.
    PretrainedImageClassifier(engine="torch", max_epochs=2, hidden_units=(8,), optimizer__betas=(0.8, 0.9),
                              criterion__label_smoothing=0.1).fit(X, y)
    # A way of stepping the user chose replaces the fused kernel sktransfer picks by default.
    for chosen in [dict(optimizer__foreach=True), dict(optimizer__foreach=False)]:
        clf = PretrainedImageClassifier(engine="torch", max_epochs=2, hidden_units=(8,), **chosen).fit(X, y)
        group = clf.head_.optimizer_.param_groups[0]
        assert not group["fused"] and all(group[k] is v for k, v in
                                          {k.split("__")[1]: v for k, v in chosen.items()}.items())


def test_unknown_settings_are_stored_and_refused_at_fit_with_a_hint(sample):
    paths, labels = sample
    X, y = paths[:12:2] + paths[30:42:2], labels[list(range(0, 12, 2)) + list(range(30, 42, 2))]
    for setting, hint in [("optimzer__lr", "did you mean 'optimizer__lr'"),
                          ("criterion_label_smoothing", "did you mean 'criterion__label_smoothing'"),
                          ("max_epoch", "did you mean 'max_epochs'")]:
        clf = PretrainedImageClassifier(**{setting: 1})
        assert clone(clf).get_params()[setting] == 1
        with pytest.raises(ValueError, match=hint):
            clf.fit(X, y)
    with pytest.raises(ValueError, match="CrossEntropyLoss has no argument 'label_smothing'"):
        PretrainedImageClassifier(criterion__label_smothing=0.1).fit(X, y)
    with pytest.raises(ValueError, match="HeadModule has no argument 'width'"):
        PretrainedImageClassifier(module__width=3).fit(X, y)
    with pytest.raises(ValueError, match="LBFGS has no argument 'betas'"):
        PretrainedImageClassifier(optimizer=torch.optim.LBFGS, optimizer__betas=(0.5, 0.6)).fit(X, y)


def test_criterion_and_module_settings_reach_the_head(halves):
    paths, labels, _, _, train, _ = halves
    X, y = [paths[i] for i in train], labels[train]
    plain = PretrainedImageClassifier(random_state=0).fit(X, y)
    smooth = PretrainedImageClassifier(random_state=0, criterion__label_smoothing=0.2).fit(X, y)
    assert smooth.head_.criterion_.label_smoothing == 0.2
    # Smoothed targets keep the head from becoming sure of any photo.
    assert smooth.predict_proba(X).max() < plain.predict_proba(X).max()
    mlp = PretrainedImageClassifier(hidden_units=(8,), module__dropout=0.5, max_epochs=1).fit(X, y)
    assert mlp.head_.module_.layers[0].p == 0.5  # the user's module setting wins over dropout=0.0


def test_calibration_is_a_callback_fitted_when_training_ends(halves):
    paths, labels, _, _, train, _ = halves
    X, y = [paths[i] for i in train], labels[train]
    clf = PretrainedImageClassifier(calibration="temperature", validation_fraction=0.3, random_state=0).fit(X, y)
    callback = dict(clf.head_.callbacks_)["calibration"]
    assert isinstance(callback, TemperatureScaling) and clf.temperature_ == callback.temperature_ != 1.0
    assert "calibration" not in dict(PretrainedImageClassifier(max_epochs=1).fit(X, y).head_.callbacks_)


def test_calibration_weighs_the_held_out_images_as_training_does(halves):
    # All the held-out weight on one image the head gets right: the temperature is the one that
    # image's loss wants, the sharpest of the grid. Weights scaled alike change nothing.
    paths, labels, _, _, train, _ = halves
    X, y = [paths[i] for i in train], labels[train]
    clf = PretrainedImageClassifier(calibration="temperature", validation_fraction=0.3, random_state=0).fit(X, y)
    net, callback = clf.head_, dict(clf.head_.callbacks_)["calibration"]
    Z, y_enc = clf.embedder_.transform(X), np.searchsorted(clf.classes_, y)
    _, valid = net.train_split(net.get_dataset({"X": Z}, y_enc), y_enc)
    held_out = np.asarray(valid.indices)
    unweighted = callback.temperature_
    callback.on_train_end(net, X={"X": Z, "sample_weight": np.full(len(X), 3.0, dtype=np.float32)}, y=y_enc)
    assert callback.temperature_ == unweighted
    right = held_out[clf.predict([X[i] for i in held_out]) == y[held_out]]
    weights = np.zeros(len(X), dtype=np.float32)
    weights[right[0]] = 1.0
    callback.on_train_end(net, X={"X": Z, "sample_weight": weights}, y=y_enc)
    assert callback.temperature_ < unweighted  # sharper: that image's loss wants the sharpest


def test_the_temperature_is_the_most_probable_one_not_the_edge_of_the_grid():
    from sktransfer._head import fit_temperature

    rng = np.random.default_rng(0)
    # A few held-out images, all classified right: the log loss alone falls all the way to the
    # grid's end (probabilities of 0 and 1); the prior keeps the temperature near 1.
    logits = rng.normal(size=(6, 4)) + 6 * np.eye(4)[[0, 1, 2, 3, 0, 1]]
    y = np.array([0, 1, 2, 3, 0, 1])
    assert (logits.argmax(axis=1) == y).all()
    assert fit_temperature(logits, y, prior_std=1e9) < 0.2
    assert 0.5 < fit_temperature(logits, y) < 1.0
    # Many images: the data decide. Labels drawn from softmax(logits / 2) give a temperature of 2.
    logits = 3 * rng.normal(size=(5000, 4))
    p = np.exp(logits / 2) / np.exp(logits / 2).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(4, p=row) for row in p])
    assert fit_temperature(logits, y) == pytest.approx(2.0, rel=0.08)
    assert fit_temperature(logits, y, weights=np.full(5000, 7.0)) == fit_temperature(logits, y)


# -- batching of cached features ------------------------------------------------------

def test_feature_loader_batches_every_row_once_per_epoch():
    from skorch.dataset import Dataset

    X = np.arange(23 * 2, dtype=np.float32).reshape(23, 2)
    loader = FeatureLoader(Dataset({"X": X}, np.arange(23)), batch_size=5, shuffle=True)
    torch.manual_seed(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    seen = torch.cat([b[1] for b in batches]).sort().values
    assert seen.tolist() == list(range(23))
    assert all(torch.equal(b[0]["X"][:, 0], 2 * b[1].float()) for b in batches)  # rows stay with their targets
    dropped = FeatureLoader(Dataset({"X": X}, np.arange(23)), batch_size=5, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 4


def test_pick_view_draws_one_view_per_image_in_training_and_keeps_all_otherwise():
    X = torch.arange(4 * 3 * 2, dtype=torch.float32).reshape(4, 3, 2)  # 4 images, 3 views
    picked, n_views = pick_view(X, training=True)
    assert picked.shape == (4, 2) and n_views is None
    assert all(any(torch.equal(picked[i], X[i, v]) for v in range(3)) for i in range(4))
    flat, n_views = pick_view(X, training=False)
    assert flat.shape == (12, 2) and n_views == 3
    plain = torch.ones(4, 2)
    assert pick_view(plain, training=True) == (plain, None)


def test_tune_l2_leaves_out_folds_without_weight_on_both_parts(halves):
    _, labels, features, _, _, _ = halves
    Z = standardised(features, np.arange(len(features))).astype(np.float32)
    y = np.unique(labels, return_inverse=True)[1]
    order = np.arange(len(y))
    folds = [(order[60:], order[:60]), (order[np.r_[0:60, 120:len(y)]], order[60:120]),
             (order[:120], order[120:])]
    weights = np.zeros(len(y), np.float32)
    weights[:60] = weights[120:130] = 1.0  # the second fold holds out no weight
    criterion = torch.nn.CrossEntropyLoss(reduction="none")
    l2, weight, bias = tune_l2(Z, y, weights, criterion, len(np.unique(y)), folds)
    assert l2 in L2_GRID and torch.isfinite(weight).all() and torch.isfinite(bias).all()
    # All weight in one fold's held-out part: that fold has nothing to train on, the
    # others nothing to score; nothing to tune on, so the middle strength and no start.
    weights[:] = 0.0
    weights[:2] = 1.0
    assert tune_l2(Z, y, weights, criterion, len(np.unique(y)), folds) == (L2_GRID[len(L2_GRID) // 2], None, None)


def test_tuned_head_fits_with_weight_on_few_images_and_tiny_sets(halves, sample):
    paths, labels, _, brightness, train, _ = halves
    X, y = [paths[i] for i in train], labels[train]
    weights = np.zeros(len(X))
    weights[:2] = weights[-2:] = 1.0  # two photos of the first class, two of the last
    clf = PretrainedImageClassifier(random_state=0).fit(X, y, sample_weight=weights)
    assert clf.classes_.tolist() == [y[0], y[-1]] and np.isfinite(clf.predict_proba(X)).all()
    reg = PretrainedImageRegressor(random_state=0).fit(X[:1], brightness[train][:1])  # one image: no folds
    assert np.isfinite(reg.predict(X[:2])).all()


def test_tuned_start_leaves_held_out_images_and_skorch_module_shapes_alone(halves):
    paths, labels, _, _, train, _ = halves
    X, y = [paths[i] for i in train], labels[train]
    # early_stopping and calibration hold images out: the start must not have seen them.
    for settings in ({"early_stopping": True}, {"calibration": "temperature"}):
        clf = PretrainedImageClassifier(random_state=0, **settings).fit(X, y)
        assert isinstance(clf.head_.optimizer_, torch.optim.LBFGS)
        assert "initial_weights" not in dict(clf.head_.callbacks_)
    # A hidden layer asked of the skorch module directly is a hidden layer: AdamW, not the tuned linear head.
    mlp = PretrainedImageClassifier(module__hidden_units=(16,), max_epochs=2, random_state=0).fit(X, y)
    assert isinstance(mlp.head_.optimizer_, torch.optim.AdamW) and len(mlp.head_.module_.layers) == 5


@pytest.mark.parametrize("settings", [{}, {"weight_decay": 0.1}, {"hidden_units": (8,), "max_epochs": 3},
                                      {"early_stopping": True, "max_epochs": 3}])
def test_images_of_zero_sample_weight_are_the_same_as_no_images(halves, settings):
    # As scikit-learn's estimators do: weight 0 leaves an image out of the feature statistics, the
    # tuning folds, the held-out split and the mini-batches, not only out of the loss.
    paths, labels, _, brightness, train, test = halves
    X, y = [paths[i] for i in train], labels[train]
    extra = [paths[i] for i in test[:8]]
    wrong = np.roll(labels[test[:8]], 1)
    weights = np.r_[np.zeros(4), np.ones(len(X)), np.zeros(4)]  # in front, and behind
    with_zeros = PretrainedImageClassifier(random_state=0, **settings).fit(
        extra[:4] + X + extra[4:], np.r_[wrong[:4], y, wrong[4:]], sample_weight=weights)
    without = PretrainedImageClassifier(random_state=0, **settings).fit(X, y)
    held_out = [paths[i] for i in test]
    np.testing.assert_allclose(with_zeros.predict_proba(held_out), without.predict_proba(held_out), atol=1e-6)
    target = brightness[train]
    reg_with = PretrainedImageRegressor(random_state=0, **settings).fit(
        extra[:4] + X + extra[4:], np.r_[np.full(4, 255.0), target, np.zeros(4)], sample_weight=weights)
    reg_without = PretrainedImageRegressor(random_state=0, **settings).fit(X, target)
    np.testing.assert_allclose(reg_with.predict(held_out), reg_without.predict(held_out), rtol=1e-5, atol=1e-4)
