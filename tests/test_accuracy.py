"""The accuracy levers: cached augmentation views, TTA, weights, fine-tuning, calibration."""

import os

import numpy as np
import pytest
import sklearn
import torch
from PIL import Image, ImageOps
from sklearn.model_selection import GridSearchCV
from torchvision import transforms as T

from sktransfer import PretrainedImageClassifier, clear_cache
from sktransfer._augment import tta_views
from sktransfer._backbones import build_backbone
from sktransfer._features import extract_features, view_fingerprint

from conftest import ForwardCounter, assert_same_in_fresh_process, dataset, subset

FAST = dict(max_epochs=15, random_state=0)


# -- augmentation at cached cost ----------------------------------------------

def test_augment_embeds_each_view_once_and_reuses_them_across_a_grid(flowers_small):
    X, y = flowers_small
    X, y = X[::2], y[::2]  # 15 images, 5 per class
    clear_cache()
    body = build_backbone("efficientnet_lite0").module
    with ForwardCounter(body) as counter:
        a = PretrainedImageClassifier(augment="light", n_views=3, **FAST).fit(X, y)
        assert counter.images == 15 * 3  # no plain pass: training sees only views
        search = GridSearchCV(PretrainedImageClassifier(augment="light", n_views=3, **FAST),
                              {"lr": [1e-3, 1e-2], "hidden_units": [(), (16,)]}, cv=3).fit(X, y)
        # 4 candidates x 3 folds + refit reuse the views; scoring embeds the plain photos once.
        assert counter.images == 15 * 3 + 15
    assert len(search.cv_results_["params"]) == 4
    b = PretrainedImageClassifier(augment="light", n_views=3, **FAST).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))  # reproducible views
    plain = PretrainedImageClassifier(**FAST).fit(X, y)
    assert not np.array_equal(a.predict_proba(X), plain.predict_proba(X))


def test_views_differ_per_seed_and_per_view_and_from_the_plain_image(flowers_small):
    from sktransfer._augment import augment_views

    X = flowers_small[0][:4]
    backbone = build_backbone("efficientnet_lite0")
    plain = extract_features(X, backbone)
    v0, v1 = augment_views("light", 2, 0, backbone.preprocessing)
    w0, = augment_views("light", 1, 1, backbone.preprocessing)
    f0, f1, g0 = (extract_features(X, backbone, view=v) for v in (v0, v1, w0))
    for a, b in ((f0, plain), (f0, f1), (f0, g0)):
        assert not np.allclose(a, b)
    np.testing.assert_array_equal(f0, extract_features(X, backbone, view=augment_views(
        "light", 2, 0, backbone.preprocessing)[0]))


def test_user_transform_is_applied_to_the_decoded_image(flowers_small, tmp_path):
    X, y = flowers_small
    backbone = build_backbone("efficientnet_lite0")
    always_flip = T.RandomHorizontalFlip(p=1.0)
    clf = PretrainedImageClassifier(augment=always_flip, n_views=1, cache_dir=tmp_path, **FAST).fit(X, y)
    # The view's features are those of the mirrored photos, cached on disk under their own key.
    mirrored = [ImageOps.mirror(Image.open(p).convert("RGB")) for p in X[:3]]
    from sktransfer._augment import augment_views

    view, = augment_views(always_flip, 1, clf._seed(), backbone.preprocessing)
    np.testing.assert_allclose(extract_features(X[:3], backbone, view=view),
                               extract_features(mirrored, backbone), atol=1e-5)
    # Fit embedded only the view (no plain pass), into its own disk-cache folder.
    assert os.listdir(tmp_path) == [view_fingerprint(backbone.fingerprint, view)]
    with pytest.raises(TypeError, match="must return a PIL image"):
        PretrainedImageClassifier(augment=T.Compose([T.ToTensor()]), n_views=1, **FAST).fit(X, y)


def test_bad_lever_settings_name_the_parameter(flowers_small):
    X, y = flowers_small
    for bad, match in ((dict(augment="heavy"), "'augment' parameter"), (dict(n_views=0), "'n_views'"),
                       (dict(tta="rotate"), "'tta' parameter"), (dict(unfreeze=-1), "'unfreeze'"),
                       (dict(calibration="platt"), "'calibration'")):
        with pytest.raises(ValueError, match=match):
            PretrainedImageClassifier(**bad).fit(X, y)


# -- test-time augmentation ----------------------------------------------------

def test_tta_averages_the_probabilities_of_the_views(flowers_small):
    X, y = flowers_small
    clf = PretrainedImageClassifier(**FAST).fit(X, y)
    plain = clf.predict_proba(X)
    mirrored = [ImageOps.mirror(Image.open(p).convert("RGB")) for p in X]
    expected = (plain + clf.predict_proba(mirrored)) / 2
    clf.set_params(tta="flip")
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba, expected, atol=1e-5)
    assert not np.allclose(proba, plain)
    clf.set_params(tta="flip+shift")
    proba = clf.predict_proba(X)
    assert len(tta_views("flip+shift", clf.embedder_.backbone_.preprocessing)) == 6
    np.testing.assert_allclose(proba.sum(axis=1), 1)
    pred = clf.predict(X)
    np.testing.assert_array_equal(pred, clf.classes_[proba.argmax(axis=1)])
    assert clf.score(X, y) == np.mean(pred == y)


# -- class imbalance: weights reach the loss -------------------------------------

FULL_BATCH = dict(weight_decay=0.1, random_state=0)  # L-BFGS over all images at one fixed L2 strength


def test_sample_weight_acts_like_repeating_images(flowers_small):
    X, y = flowers_small
    X_test = subset(dataset("flowers5"), 10, ["daisy", "sunflower", "tulip"], offset=10)[0]
    w = np.where(np.arange(len(X)) % 3 == 0, 4.0, 1.0)
    weighted = PretrainedImageClassifier(**FULL_BATCH).fit(X, y, sample_weight=w)
    repeated_idx = np.repeat(np.arange(len(X)), w.astype(int))
    # One full batch: the weighted mean loss is the mean loss over the repeated images
    # (the head's standardisation statistics differ a little).
    repeated = PretrainedImageClassifier(**FULL_BATCH).fit([X[i] for i in repeated_idx], y[repeated_idx])
    unweighted = PretrainedImageClassifier(**FULL_BATCH).fit(X, y)
    p_w, p_r, p_u = (m.predict_proba(X_test) for m in (weighted, repeated, unweighted))
    assert np.abs(p_w - p_u).mean() > 0.01  # the weights changed the model ...
    assert np.abs(p_w - p_r).mean() < np.abs(p_w - p_u).mean() / 2  # ... the way repetition does


def test_balanced_class_weight_equals_inverse_frequency_sample_weight(flowers_small):
    X, y = flowers_small
    keep = np.r_[0:10, 10:13, 20:30]  # 10 daisy, 3 sunflower, 10 tulip
    X, y = [X[i] for i in keep], y[keep]
    counts = {c: np.sum(y == c) for c in set(y)}
    w = np.array([len(y) / (3 * counts[c]) for c in y])
    balanced = PretrainedImageClassifier(class_weight="balanced", **FULL_BATCH).fit(X, y)
    by_hand = PretrainedImageClassifier(**FULL_BATCH).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(balanced.predict_proba(X), by_hand.predict_proba(X), atol=1e-5)
    plain = PretrainedImageClassifier(**FULL_BATCH).fit(X, y)
    minority = y == "sunflower"
    assert balanced.predict_proba(X)[minority, 1].mean() > plain.predict_proba(X)[minority, 1].mean()


def test_class_weight_raises_minority_recall_on_held_out_photos():
    folder = dataset("flowers5")
    classes = ["daisy", "dandelion", "tulip"]
    X_train, y_train = [], []
    for c, n in zip(classes, (20, 20, 3)):  # tulips are rare in training
        p, l = subset(folder, n, [c])
        X_train += p
        y_train += list(l)
    X_test, y_test = subset(folder, 15, classes, offset=40)
    y_train = np.array(y_train)
    # These few photos are linearly separable, so "balanced" weights (about 5:1)
    # barely move a well-fitted head; a strong weight shows the loss honours them.
    recall = {}
    for cw in (None, {"daisy": 1, "dandelion": 1, "tulip": 100}):
        pred = PretrainedImageClassifier(class_weight=cw, random_state=0).fit(X_train, y_train).predict(X_test)
        recall[cw is None] = np.mean(pred[y_test == "tulip"] == "tulip")
    assert recall[False] > recall[True]


@pytest.mark.parametrize("routing", [False, True])
def test_grid_search_routes_sample_weight(flowers_small, routing):
    X, y = flowers_small
    w = np.where(y == "daisy", 5.0, 1.0)
    est = PretrainedImageClassifier(**FULL_BATCH)
    with sklearn.config_context(enable_metadata_routing=routing):
        if routing:
            est.set_fit_request(sample_weight=True).set_score_request(sample_weight=False)
        search = GridSearchCV(est, {"weight_decay": [0.1]}, cv=2).fit(X, y, sample_weight=w)
    direct = PretrainedImageClassifier(**FULL_BATCH).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(search.best_estimator_.predict_proba(X), direct.predict_proba(X), atol=1e-6)
    unweighted = PretrainedImageClassifier(**FULL_BATCH).fit(X, y)
    # Log-probabilities: on well-separated photos the probabilities themselves saturate near 0 and 1.
    assert not np.allclose(np.log(direct.predict_proba(X)), np.log(unweighted.predict_proba(X)), atol=1e-3)


# -- fine-tuning -----------------------------------------------------------------

def test_unfreeze_trains_a_copy_of_the_last_blocks_and_runs_the_frozen_part_once(flowers_small):
    X, y = flowers_small
    clear_cache()
    backbone = build_backbone("efficientnet_lite0")
    before = {k: v.clone() for k, v in backbone.module.state_dict().items()}
    prefix = backbone.prefix(2)
    with ForwardCounter(prefix.module.net) as counter:
        clf = PretrainedImageClassifier(unfreeze=2, backbone_lr_mult=0.02, lr=0.01, **FAST).fit(X, y)
        clf.predict(X)
        PretrainedImageClassifier(unfreeze=2, lr=0.01, max_epochs=3).fit(X, y)
        assert counter.images == 30  # cached boundary activations: once per image
    after = backbone.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the shared backbone is untouched
    groups = clf.head_.optimizer_.param_groups
    assert sorted(g["lr"] for g in groups) == pytest.approx([0.0002, 0.01])
    tuned = clf.head_.module_.blocks
    original = backbone.blocks(2)
    trained = [not torch.equal(a, b) for a, b in zip(tuned.parameters(), original.parameters())]
    assert any(trained)
    # BatchNorm running statistics stay the pretrained ones (eval mode in training).
    for (name, a), (_, b) in zip(tuned.named_buffers(), original.named_buffers()):
        assert torch.equal(a, b), name
    # Prediction runs frozen part -> trained blocks -> head.
    acts = torch.from_numpy(extract_features(X, prefix))
    with torch.no_grad():
        logits = clf.head_.module_.eval()(acts)
    np.testing.assert_allclose(clf.predict_proba(X), torch.softmax(logits, 1).numpy(), atol=1e-5)
    assert clf.score(X, y) > 0.8


def test_unfreeze_split_of_a_resnet_reproduces_the_body():
    backbone = build_backbone("resnet18", weights=None)
    prefix = backbone.prefix(1)
    assert prefix.shape == (256, 14, 14)
    assert len(list(backbone.blocks(4))) == 4
    with pytest.raises(ValueError, match="has 4 blocks"):
        backbone.prefix(5)


def test_unfreeze_on_a_backbone_without_known_blocks_fails_before_embedding(flowers_small):
    X, y = flowers_small
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.ReLU())
    clf = PretrainedImageClassifier(backbone=net, unfreeze=1, **FAST)
    clear_cache()
    with pytest.raises(ValueError, match="no known split into blocks"):
        clf.fit(X, y)
    from sktransfer import cache_info

    assert cache_info()["entries"] == 0


@pytest.mark.slow
def test_fine_tuned_model_with_views_and_tta_pickles_into_a_fresh_process(tmp_path, flowers_small):
    X, y = flowers_small
    clf = PretrainedImageClassifier(unfreeze=1, augment="flip", n_views=2, tta="flip",
                                    calibration="temperature", validation_fraction=0.3, **FAST).fit(X, y)
    assert_same_in_fresh_process(clf, X, tmp_path, method="predict_proba", atol=1e-6)


# -- calibration -------------------------------------------------------------------

def test_temperature_scales_the_logits_without_changing_predictions(flowers_small):
    X, y = flowers_small
    from sktransfer._head import fit_temperature

    clf = PretrainedImageClassifier(calibration="temperature", validation_fraction=0.3, **FAST).fit(X, y)
    # The temperature is the one the held-out images' logits call for (1.0 where the prior
    # outweighs a few images the head separates by far: the stand-in photos without ../shared).
    Z, y_enc = clf.embedder_.transform(X), np.searchsorted(clf.classes_, y)
    _, valid = clf.head_.train_split(clf.head_.get_dataset({"X": Z}, y_enc), y_enc)
    held_out = np.asarray(valid.indices)
    with torch.no_grad():
        logits = clf.head_.forward({"X": Z}, training=False)
    assert clf.temperature_ == fit_temperature(logits.numpy()[held_out], y_enc[held_out])
    np.testing.assert_allclose(clf.predict_proba(X), torch.softmax(logits / clf.temperature_, 1).numpy(),
                               atol=1e-5)
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[logits.argmax(1).numpy()])
    assert len(clf.history_) <= 15 and "valid_loss" in clf.history_[0]  # held out, as documented


def test_with_augmented_views_the_temperature_is_fitted_on_the_logits_predict_gives(flowers_small):
    # Training sees augmented views; the held-out images are scored as predict scores them, on
    # the plain photo, for the temperature and for early stopping's validation loss alike.
    X, y = flowers_small
    from sktransfer._head import fit_temperature

    clf = PretrainedImageClassifier(augment="strong", n_views=2, calibration="temperature", validation_fraction=0.3,
                                    hidden_units=(32,), **FAST).fit(X, y)
    Z, y_enc = clf.embedder_.transform(X), np.searchsorted(clf.classes_, y)
    _, valid = clf.head_.train_split(clf.head_.get_dataset({"X": Z}, y_enc), y_enc)
    held_out = np.asarray(valid.indices)
    with torch.no_grad():
        logits = clf.head_.forward({"X": Z}, training=False).numpy()
    assert clf.temperature_ == fit_temperature(logits[held_out], y_enc[held_out])
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits[held_out]), torch.from_numpy(y_enc[held_out]))
    assert clf.history_[-1]["valid_loss"] == pytest.approx(float(loss), rel=1e-5)
