"""Grad-CAM: which parts of an image the head relied on.

For a CNN backbone, the gradient of a class logit (through the trained head)
with respect to the backbone's last spatial feature map weighs that map's
channels; their weighted sum, rectified, is a heatmap over the image
(Selvaraju et al., 2017). The gradients are computed on a private copy of
the backbone body: the frozen, shared body is never touched.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image
from sklearn.utils.validation import check_is_fitted

from ._images import load_pixels
from ._inputs import ImageInputError, as_image_list, error_reason, read_item

__all__ = ["explain"]


def _last_feature_map_module(body, crop_shape):
    """The module whose output is the body's last spatial (N x C x H x W, H*W > 1) activation."""
    finished = []
    hooks = [m.register_forward_hook(lambda m, i, o: finished.append((m, o)))
             for m in body.modules() if m is not body]
    try:
        with torch.no_grad():
            body(torch.zeros(1, 3, *crop_shape))
    finally:
        for h in hooks:
            h.remove()
    # Forward hooks fire when a module finishes, so the last 4-D output in this
    # order is the deepest feature map before pooling, for any architecture.
    maps = [m for m, out in finished
            if torch.is_tensor(out) and out.ndim == 4 and out.shape[2] * out.shape[3] > 1]
    return maps[-1] if maps else None


def _jet(values):
    """The classic 'jet' colour ramp (blue, cyan, yellow, red) of values in [0, 1]."""
    v = values[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


def explain(estimator, X, target=None, alpha=0.5, return_heatmaps=False):
    """Grad-CAM heatmaps of a fitted classifier over its CNN backbone, laid over the images.

    Parameters
    ----------
    estimator : PretrainedImageClassifier
        Fitted, with a convolutional backbone (one with a spatial feature map).
    X : sequence of images
        Paths, bytes, PIL images or uint8 arrays.
    target : label, sequence of labels or None, default=None
        The class to explain for every image, or one class per image; by
        default each image's predicted class.
    alpha : float, default=0.5
        Opacity of the heatmap over the image, in [0, 1].
    return_heatmaps : bool, default=False
        Also return the heatmaps.

    Returns
    -------
    overlays : list of PIL.Image.Image
        The backbone's view of each image (resized and centre-cropped as it
        is embedded, ``crop_size`` pixels square) with the heatmap on top:
        red where the explained class's score rose most with the feature map.
    heatmaps : ndarray of shape (n_images, crop_size, crop_size), float32
        Only with ``return_heatmaps``: values in [0, 1] per image (all zeros
        when nothing in the image raised the class score).
    """
    from ._estimator import PretrainedImageClassifier

    if not isinstance(estimator, PretrainedImageClassifier):
        raise TypeError(
            f"explain needs a fitted PretrainedImageClassifier, got {type(estimator).__name__}: Grad-CAM "
            "follows a class score back through the trained head into the backbone's feature map, and "
            "only that estimator holds both."
        )
    check_is_fitted(estimator, ["embedder_", "head_"])
    if getattr(estimator, "unfreeze_", 0):
        raise ValueError(
            f"explain does not support models fine-tuned with unfreeze={estimator.unfreeze_} yet: their "
            "last backbone blocks live in the head. Explain a frozen-backbone model (unfreeze=0)."
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} must be between 0 and 1 (the heatmap's opacity).")
    items = as_image_list(X)
    backbone = estimator.embedder_.backbone_
    prep = backbone.preprocessing
    classes = list(np.asarray(estimator.classes_).tolist())
    if target is None:
        targets = [None] * len(items)
    else:
        many = isinstance(target, (list, tuple, np.ndarray)) and not isinstance(target, str)
        targets = list(target) if many else [target] * len(items)
        if len(targets) != len(items):
            raise ValueError(f"target has {len(targets)} labels for {len(items)} images; give one, or one per image.")
        unknown = sorted({repr(t) for t in targets if t not in classes})
        if unknown:
            raise ValueError(f"target {', '.join(unknown)} is not a class of the model; its classes are {classes}.")

    # A private copy with gradients enabled; the shared body stays frozen and unchanged.
    body = copy.deepcopy(backbone.module).cpu().eval().requires_grad_(True)
    layer = _last_feature_map_module(body, prep.crop_shape)
    if layer is None:
        raise ValueError(
            f"backbone {backbone.name!r} has no spatial feature map (no N x C x H x W activation "
            "with H*W > 1); Grad-CAM needs a convolutional backbone such as efficientnet_lite0 or resnet50."
        )
    head = copy.deepcopy(estimator.head_.module_).cpu().eval()

    arrays, errors = [], []
    for i, item in enumerate(items):
        try:
            arrays.append(load_pixels(read_item(item)[1], prep))  # the pixels the features came from
        except (OSError, ValueError, TypeError) as e:
            errors.append((i, item, error_reason(e)))
    if errors:
        raise ImageInputError(errors)

    captured = {}
    handle = layer.register_forward_hook(lambda m, i, o: captured.__setitem__("map", o))
    heatmaps = np.zeros((len(items), *prep.crop_shape), dtype=np.float32)
    try:
        for i, array in enumerate(arrays):
            x = prep.normalize([array])
            with torch.enable_grad():
                logits = head(body(x))
                column = int(logits.argmax(1)) if targets[i] is None else classes.index(targets[i])
                fmap = captured["map"]
                (grads,) = torch.autograd.grad(logits[0, column], fmap)
            weights = grads.mean(dim=(2, 3), keepdim=True)
            cam = torch.relu((weights * fmap).sum(dim=1, keepdim=True)).detach()
            cam = torch.nn.functional.interpolate(cam, size=prep.crop_shape, mode="bilinear",
                                                  align_corners=False)[0, 0]
            top = float(cam.max())
            heatmaps[i] = (cam / top).numpy() if top > 0 else 0.0
    finally:
        handle.remove()

    overlays = [
        Image.fromarray(((1 - alpha) * array + alpha * _jet(heat)).round().astype(np.uint8))
        for array, heat in zip(arrays, heatmaps)
    ]
    return (overlays, heatmaps) if return_heatmaps else overlays
