"""The estimators in a notebook: scikit-learn's HTML diagram with the backbone and head summarised.

scikit-learn draws an estimator from its ``_sk_visual_block_``: here a
serial block of boxes, the backbone (then the head), each with a one-line
name and details that unfold on click, inside the estimator's own box with
its parameters. Nothing is built or loaded to draw it: an
unfitted model shows its settings, a fitted one what fit made.
"""

from __future__ import annotations

import numpy as np

try:  # scikit-learn >= 1.7
    from sklearn.utils._repr_html.estimator import _VisualBlock
except ImportError:  # scikit-learn 1.6
    from sklearn.utils._estimator_html_repr import _VisualBlock


def _backbone_box(embedder_params, backbone=None, unfreeze=0):
    """Name and details of the backbone box; ``backbone`` is the fitted :class:`Backbone`."""
    given = embedder_params["backbone"]
    name = given if isinstance(given, str) else type(given).__name__
    trained = f"last {unfreeze} block(s) fine-tuned" if unfreeze else "frozen"
    if backbone is not None and isinstance(given, str):
        name = backbone.name  # what fit built, whatever set_params changed since
    if backbone is None:
        return f"backbone: {name}", f"weights={embedder_params['weights']!r}, {trained}\n(not loaded yet: fit loads it)"
    prep = backbone.preprocessing
    h, w = prep.crop_shape
    resize = (f"shorter side to {prep.resize_size}" if isinstance(prep.resize_size, int)
              else "resized to cover {}x{}".format(*prep.resize_size))
    steps = {"center": f"{resize} ({prep.interpolation}), centre crop",
             "squash": f"squashed ({prep.interpolation}), centre crop",
             "border": f"fitted inside ({prep.interpolation}), padded with the mean colour"}[prep.crop_mode]
    details = (f"{backbone.num_features} features per image, {trained}\n"
               f"input {h}x{w} px: {steps}\nmean {prep.mean}, std {prep.std}\n"
               f"fingerprint {backbone.fingerprint[:12]}")
    return f"backbone: {name} -> {backbone.num_features} features", details


def _head_box(model):
    """Name and details of the head box: the settings unfitted, the trained head once fitted
    (``set_params`` after fit changes the next fit, not ``head_``)."""
    if not hasattr(model, "head_"):
        return (f"head: {_layers(model.hidden_units)}",
                _settings(model.lr, model.max_epochs, model.batch_size, model.dropout, model.weight_decay)
                + "\n(trained by fit)")
    head = model.head_
    kind = _layers(head.module__hidden_units)
    if hasattr(model, "classes_"):
        classes = model.classes_.tolist()
        shown = ", ".join(map(str, classes[:10])) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
        out = f"{len(classes)} {'labels (sigmoid)' if model.multilabel_ else 'classes (softmax)'}"
        extra = f"\nclasses: {shown}\ntemperature {model.temperature_:.3g}"
    else:
        out = f"{model.n_outputs_} output(s)"
        scaled = np.any(model.target_mean_ != 0) or np.any(model.target_scale_ != 1)
        extra = "\ntarget scaling undone at predict" if scaled else ""
    if model.weight_decay_ is not None:
        # The full-batch linear head reads neither lr nor batch_size: say what it was fitted at.
        settings = f"L-BFGS, full batch, L2 strength {model.weight_decay_:.3g} (weight_decay_)"
    else:
        # The decay the optimizer applied, or the loss's penalty for an optimizer without one.
        trained = head.get_params()
        decay = trained.get("optimizer__weight_decay", trained.get("l2"))
        settings = _settings(head.lr, head.max_epochs, head.batch_size, head.module__dropout, decay)
    epochs = len(model.history_)
    return f"head: {kind} -> {out}", f"{settings}\ntrained {epochs} epoch(s){extra}"


def _layers(hidden_units):
    return "MLP " + " -> ".join(str(u) for u in hidden_units) if hidden_units else "linear"


def _settings(lr, max_epochs, batch_size, dropout, weight_decay):
    return (f"lr={lr}, max_epochs={max_epochs}, batch_size={batch_size}, "
            f"dropout={dropout}, weight_decay={weight_decay}")


def _box(name, details):
    return _VisualBlock("single", name, names=name, name_details=details)


def visual_block(estimator):
    """The HTML diagram of an :class:`ImageEmbedder` or a classifier/regressor."""
    from ._estimator import ImageEmbedder

    if isinstance(estimator, ImageEmbedder):
        boxes = [_backbone_box(estimator.get_params(), getattr(estimator, "backbone_", None))]
    else:
        fitted = getattr(estimator, "embedder_", None)
        boxes = [_backbone_box(estimator.get_params(), fitted.backbone_ if fitted is not None else None,
                               getattr(estimator, "unfreeze_", estimator.unfreeze)),
                 _head_box(estimator)]
    names = [name for name, _ in boxes]
    return _VisualBlock("serial", [_box(*box) for box in boxes], names=names,
                        name_details=[details for _, details in boxes], dash_wrapped=False)
