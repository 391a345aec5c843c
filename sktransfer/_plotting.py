"""Pictures of a fitted classifier: its worst mistakes and its training curves.

Both functions return a matplotlib ``Figure`` (saved with
``fig.savefig("file.png")``) and never call ``plt.show()``. The confusion
matrix is scikit-learn's own :class:`sklearn.metrics.ConfusionMatrixDisplay`,
which works with these estimators as with any classifier.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.utils.validation import check_is_fitted

from ._images import load_pixels, open_image
from ._inputs import as_image_list, read_item

__all__ = ["plot_top_losses", "plot_history"]

#: Size of one picture of the grid of :func:`plot_top_losses`, in inches (width, height).
CELL_SIZE = (3.0, 3.3)


def _figure(figsize):
    """A figure not attached to pyplot, so nothing opens a window or leaks figures."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "sktransfer's pictures need matplotlib: pip install 'sktransfer[plot]' (or matplotlib)."
        ) from None
    return Figure(figsize=figsize)


def top_losses(estimator, X, y):
    """Each image's loss under ``estimator``: minus the log-probability of its true class.

    Returns
    -------
    losses : ndarray of shape (n_images,)
    predicted : ndarray of shape (n_images,)
        The predicted class of each image.
    confidence : ndarray of shape (n_images,)
        The probability of the predicted class.
    """
    check_is_fitted(estimator)
    items = as_image_list(X)
    y = np.asarray(y, dtype=object)
    if len(y) != len(items):
        raise ValueError(f"X has {len(items)} images but y has {len(y)} labels; they must match.")
    classes = np.asarray(estimator.classes_, dtype=object)
    column = {c: i for i, c in enumerate(classes.tolist())}
    unseen = sorted({repr(v) for v in y.tolist() if v not in column})
    if unseen:
        raise ValueError(
            f"y has labels the model does not know: {', '.join(unseen)}; "
            f"the model knows {', '.join(map(repr, classes.tolist()))}."
        )
    proba = np.asarray(estimator.predict_proba(items), dtype=np.float64)
    true = np.array([column[v] for v in y.tolist()])
    losses = -np.log(np.clip(proba[np.arange(len(true)), true], 1e-12, None))
    best = proba.argmax(axis=1)
    return losses, np.asarray(estimator.classes_)[best], proba[np.arange(len(best)), best]


def plot_top_losses(estimator, X, y, k=9, wrong_only=False):
    """A grid of the ``k`` images the classifier got most confidently wrong.

    Images are ranked by their loss (minus the log-probability the model
    gives their true class), highest first; each is titled with the
    predicted class and its probability, the true class and the loss, and
    shown as the model saw it (decoded, resized and cropped by its
    backbone's preprocessing; a Pipeline's images as decoded).

    Parameters
    ----------
    estimator : fitted classifier with ``predict_proba`` and ``classes_``
        A :class:`PretrainedImageClassifier`, or a Pipeline ending in a classifier.
    X : sequence of images
        Paths, bytes, PIL images or uint8 arrays.
    y : array-like of shape (n_images,)
        The true labels.
    k : int, default=9
        Number of images shown, at most.
    wrong_only : bool, default=False
        Show only misclassified images (fewer than ``k`` when there are fewer).

    Returns
    -------
    fig : matplotlib.figure.Figure
        ``ceil(sqrt(k))`` columns of ``CELL_SIZE`` inches each. ``fig.indices``
        holds the positions in ``X`` of the images shown, in order.
    """
    if not (isinstance(k, (int, np.integer)) and k >= 1):
        raise ValueError(f"k={k!r} must be a positive integer (the number of images shown).")
    items = as_image_list(X)
    losses, predicted, confidence = top_losses(estimator, items, y)
    y = np.asarray(y, dtype=object)
    order = np.argsort(-losses, kind="stable")
    if wrong_only:
        order = order[predicted[order].astype(object) != y[order]]
    order = order[:k]
    ncols = math.ceil(math.sqrt(k))
    nrows = math.ceil(k / ncols)
    fig = _figure((CELL_SIZE[0] * ncols, CELL_SIZE[1] * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    embedder = getattr(estimator, "embedder_", None)  # a Pipeline shows the decoded image
    for ax, i in zip(axes, order):
        payload = read_item(items[i])[1]
        # The pixels the model saw: decoded, resized and cropped as they were embedded.
        ax.imshow(open_image(payload) if embedder is None
                  else load_pixels(payload, embedder.backbone_.preprocessing))
        ax.set_title(
            f"predicted {predicted[i]} ({confidence[i]:.2f})\ntrue {y[i]}, loss {losses[i]:.2f}",
            fontsize=9, color="firebrick" if predicted[i] != y[i] else "black",
        )
    if len(order) == 0:
        axes[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center",
                     transform=axes[0].transAxes)
    fig.suptitle("Top losses: predicted (probability) / true class", fontsize=11)
    fig.indices = order.tolist()
    return fig


def plot_history(estimator, keys=None):
    """Training curves of the head: loss (and validation metrics) per epoch.

    Parameters
    ----------
    estimator : PretrainedImageClassifier, skorch net or skorch History
        A fitted classifier (its ``history_``), a skorch net (its ``history``),
        or a history itself.
    keys : list of str, default=None
        History columns to draw; by default ``train_loss`` and, when recorded
        (``early_stopping=True``), ``valid_loss`` and ``valid_acc``.

    Returns
    -------
    fig : matplotlib.figure.Figure
        Losses on the left axis; accuracies, when drawn, on a right axis.
    """
    if hasattr(type(estimator), "history_"):
        history = estimator.history_  # NotFittedError before fit
    else:
        history = getattr(estimator, "history", estimator)
    if not hasattr(history, "__getitem__") or len(history) == 0:
        raise ValueError(
            "plot_history needs a fitted PretrainedImageClassifier, a skorch net or a skorch "
            f"History with at least one epoch; got {type(estimator).__name__}."
        )
    recorded = set().union(*(row.keys() for row in history))
    if keys is None:
        keys = [key for key in ("train_loss", "valid_loss", "valid_acc") if key in recorded]
    missing = [key for key in keys if key not in recorded]
    if missing:
        raise ValueError(f"keys {missing} are not in the history; it records {sorted(recorded)}.")
    epochs = history[:, "epoch"]
    fig = _figure((6.4, 4.0))
    ax = fig.subplots()
    right = None
    for key in keys:
        target = ax
        if not key.endswith("loss"):
            right = right or ax.twinx()
            target = right
        target.plot(epochs, history[:, key], marker="." if len(epochs) < 30 else None, label=key,
                    color=f"C{keys.index(key)}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if right is not None:
        right.set_ylabel("accuracy")
    handles = ax.get_lines() + (right.get_lines() if right is not None else [])
    ax.legend(handles, [h.get_label() for h in handles], loc="upper right")
    ax.set_title("Head training")
    fig.tight_layout()
    return fig
