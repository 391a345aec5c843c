"""The estimators in a notebook: scikit-learn's HTML diagram summarises backbone and head."""

import html
import re

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.utils import estimator_html_repr

from sktransfer import ImageEmbedder, PretrainedImageClassifier, PretrainedImageRegressor

from conftest import SAMPLE, subset


def boxes(estimator):
    """The unfolding details of the boxes of the estimator's diagram, as a notebook shows it."""
    page = estimator._repr_html_()
    return [html.unescape(d) for d in re.findall(r"<pre>([^<]*)</pre>", page)]


def test_unfitted_models_show_their_settings_without_loading_anything():
    clf = PretrainedImageClassifier("resnet18", hidden_units=(64,), unfreeze=1)
    shown = boxes(clf)
    assert "backbone: resnet18" in clf._repr_html_() and "head: MLP 64" in clf._repr_html_()
    assert any("weights='DEFAULT', last 1 block(s) fine-tuned\n(not loaded yet" in d for d in shown)
    assert not hasattr(clf, "embedder_")  # drawing built nothing
    assert f"backbone: {ImageEmbedder().backbone}" in ImageEmbedder()._repr_html_()


def test_fitted_models_show_what_fit_made():
    X, y = subset(SAMPLE, 3, ["cardboard", "glass", "metal"])
    clf = PretrainedImageClassifier(max_epochs=4, random_state=0).fit(X, y)
    page = clf._repr_html_()
    backbone = f"backbone: {clf.backbone} -&gt; {clf.embedder_.backbone_.num_features} features"
    assert backbone in page
    assert "head: linear -&gt; 3 classes (softmax)" in page
    shown = boxes(clf)
    prep = clf.embedder_.backbone_.preprocessing
    assert any(f"input {prep.crop_size}x{prep.crop_size} px: shorter side to {prep.resize_size}" in d
               for d in shown)
    # The full-batch linear head reads neither lr nor batch_size: it shows its L2 strength and steps.
    epochs = len(clf.history_)
    assert any(f"L-BFGS, full batch, L2 strength {clf.weight_decay_:.3g} (weight_decay_)\n"
               f"trained {epochs} epoch(s)\nclasses: cardboard, glass, metal" in d for d in shown)
    mlp = PretrainedImageClassifier(hidden_units=(8,), max_epochs=2, random_state=0).fit(X, y)
    # weight_decay="auto" on a head AdamW trains: the decay it was trained with.
    assert any("lr=0.003, max_epochs=2, batch_size=64, dropout=0.0, weight_decay=0.0001\n"
               "trained 2 epoch(s)" in d for d in boxes(mlp))
    fixed = PretrainedImageClassifier(weight_decay=0.1, random_state=0).fit(X, y)
    assert any("L2 strength 0.1 (weight_decay_)" in d for d in boxes(fixed))

    reg = PretrainedImageRegressor(max_epochs=2, random_state=0).fit(X, np.arange(len(X), dtype=float))
    assert "head: linear -&gt; 1 output(s)" in reg._repr_html_()
    pipe = make_pipeline(ImageEmbedder(), LogisticRegression()).fit(X, y)
    assert backbone in estimator_html_repr(pipe)
    squash = dict(resize_size=(200, 160), crop_size=(192, 160), crop_mode="squash", interpolation="bilinear",
                  mean=(0.5,) * 3, std=(0.5,) * 3)
    assert any("input 192x160 px: squashed (bilinear), centre crop" in d
               for d in boxes(ImageEmbedder(preprocessing=squash).fit()))


def test_fitted_models_show_the_trained_head_not_settings_changed_since():
    # set_params after fit changes the next fit, not the head predict uses: the diagram shows that head.
    X, y = subset(SAMPLE, 3, ["cardboard", "glass", "metal"])
    clf = PretrainedImageClassifier(random_state=0).fit(X, y)
    clf.set_params(hidden_units=(256,), dropout=0.5, backbone="efficientnet_lite2")
    assert "head: linear -&gt; 3 classes (softmax)" in clf._repr_html_()
    assert "backbone: efficientnet_lite0 -&gt; 1280 features" in clf._repr_html_()  # the body fit built
    assert any(d.startswith("L-BFGS, full batch") for d in boxes(clf))
    mlp = PretrainedImageClassifier(hidden_units=(8,), dropout=0.2, max_epochs=2, random_state=0).fit(X, y)
    mlp.set_params(hidden_units=(), dropout=0.0, lr=0.5, max_epochs=9, batch_size=4, weight_decay=0.5)
    assert "head: MLP 8 -&gt; 3 classes (softmax)" in mlp._repr_html_()
    assert any("lr=0.003, max_epochs=2, batch_size=64, dropout=0.2, weight_decay=0.0001\n"
               "trained 2 epoch(s)" in d for d in boxes(mlp))

    target = np.arange(len(X), dtype=float)
    scaled = PretrainedImageRegressor(hidden_units=(8,), max_epochs=2, random_state=0).fit(X, target)
    scaled.set_params(target_scaling=False, hidden_units=())
    assert "head: MLP 8 -&gt; 1 output(s)" in scaled._repr_html_()
    assert any("target scaling undone at predict" in d for d in boxes(scaled))
    unscaled = PretrainedImageRegressor(target_scaling=False, max_epochs=2, random_state=0).fit(X, target)
    unscaled.set_params(target_scaling=True)
    assert not any("target scaling" in d for d in boxes(unscaled))
