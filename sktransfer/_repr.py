"""The estimators in a notebook: scikit-learn's HTML diagram with the backbone and head summarised.

scikit-learn draws an estimator from its ``_sk_visual_block_``: here a
serial block of boxes, the backbone (then the head), each with a one-line
name and details that unfold on click, inside the estimator's own box with
its parameters. Nothing is built or loaded to draw it: an
unfitted model shows its settings, a fitted one what fit made.
"""

from __future__ import annotations

try:  # scikit-learn >= 1.7
    from sklearn.utils._repr_html.estimator import _VisualBlock
except ImportError:  # scikit-learn 1.6
    from sklearn.utils._estimator_html_repr import _VisualBlock


def _backbone_box(embedder_params, backbone=None, unfreeze=0):
    """Name and details of the backbone box; ``backbone`` is the fitted :class:`Backbone`."""
    given = embedder_params["backbone"]
    name = given if isinstance(given, str) else type(given).__name__
    trained = f"last {unfreeze} block(s) fine-tuned" if unfreeze else "frozen"
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
    layers = " -> ".join(str(u) for u in model.hidden_units) or "linear"
    kind = "MLP " + layers if model.hidden_units else "linear"
    settings = (f"lr={model.lr}, max_epochs={model.max_epochs}, batch_size={model.batch_size}, "
                f"dropout={model.dropout}, weight_decay={model.weight_decay}")
    if not hasattr(model, "head_"):
        return f"head: {kind}", settings + "\n(trained by fit)"
    if hasattr(model, "classes_"):
        classes = model.classes_.tolist()
        shown = ", ".join(map(str, classes[:10])) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
        out = f"{len(classes)} {'labels (sigmoid)' if model.multilabel_ else 'classes (softmax)'}"
        extra = f"\nclasses: {shown}\ntemperature {model.temperature_:.3g}"
    else:
        out = f"{model.n_outputs_} output(s)"
        extra = "\ntarget scaling undone at predict" if model.target_scaling else ""
    if model.weight_decay_ is not None:
        # The full-batch linear head reads neither lr nor batch_size: say what it was fitted at.
        settings = f"L-BFGS, full batch, L2 strength {model.weight_decay_:.3g} (weight_decay_)"
    epochs = len(model.history_)
    return f"head: {kind} -> {out}", f"{settings}\ntrained {epochs} epoch(s){extra}"


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
