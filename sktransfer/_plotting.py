"""Pictures of a fitted classifier: its worst mistakes and its training curves.

:func:`plot_top_losses` returns a :class:`TopLossesDisplay` (scikit-learn's
Display conventions: ``from_estimator``, ``plot(ax=...)``, ``figure_``);
:func:`plot_history` returns a matplotlib ``Figure``. Nothing calls
``plt.show()``; save with ``.savefig("file.png")``. The confusion matrix is
scikit-learn's own :class:`sklearn.metrics.ConfusionMatrixDisplay`, whose
``from_estimator`` takes image paths as X with these estimators.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.utils.validation import check_is_fitted

from ._images import load_pixels, open_image
from ._inputs import as_image_list, read_item

__all__ = ["TopLossesDisplay", "plot_top_losses", "plot_history"]

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


def _fitted_titles(titles, width, height, largest=9.0, smallest=5.0):
    """``titles`` and the font size (points) at which they fit a picture ``width`` × ``height``
    inches: the widest line within the width, the two lines within a quarter of the height.
    Below ``smallest`` points the lines too long for the width are cut, ending in "…"."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    measure = RendererAgg(1, 1, 72)  # at 72 dpi a pixel is a point

    def points(line, size):
        return measure.get_text_width_height_descent(line, FontProperties(size=size), ismath=False)[0]

    lines = [line for title in titles for line in title.splitlines()]
    widest = max((points(line, largest) for line in lines), default=0.0)
    size = largest if widest == 0 else min(largest, largest * width * 72 / widest)
    size = max(smallest, min(size, largest * (height * 72 / 4) / _title_height(largest)))

    def cut(line):
        kept = line
        while kept and points(kept + "…" if kept != line else kept, size) > width * 72:
            kept = kept[:-1]
        return kept if kept == line else kept.rstrip() + "…"

    return ["\n".join(cut(line) for line in title.splitlines()) for title in titles], size


def _title_height(fontsize):
    """Points that a two-line title takes above its picture: its lines and matplotlib's title pad."""
    from matplotlib import rcParams

    return 2 * 1.2 * fontsize + rcParams["axes.titlepad"] + 2


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
    if not hasattr(estimator, "classes_") or getattr(estimator, "multilabel_", False):
        kind = "a multi-label classifier" if hasattr(estimator, "classes_") else type(estimator).__name__
        raise ValueError(f"top losses need a classifier with one class per image; the estimator is {kind}.")
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


class TopLossesDisplay:
    """The images a classifier got most confidently wrong, in scikit-learn's Display style.

    Build it with :meth:`from_estimator` (or :func:`plot_top_losses`), which
    computes the losses and draws; :meth:`plot` draws again, e.g. into axes
    of your own figure. Attribute access the display does not have goes to
    :attr:`figure_`, so ``plot_top_losses(...).savefig(...)`` works as when
    it returned the figure.

    Parameters
    ----------
    images : list of PIL.Image.Image
        The decoded images shown, in order.
    indices : list of int
        Their positions in the ``X`` they came from.
    y_true, y_pred : ndarray of shape (n_shown,)
        True and predicted class of each image shown.
    confidence, losses : ndarray of shape (n_shown,)
        Probability of the predicted class and the loss of each image shown.

    Attributes
    ----------
    figure_ : matplotlib.figure.Figure
        The figure drawn into.
    axes_ : ndarray of matplotlib.axes.Axes
        One axes per cell of the grid, row by row (the unused ones blank).
    """

    def __init__(self, images, indices, y_true, y_pred, confidence, losses):
        self.images = images
        self.indices = indices
        self.y_true = y_true
        self.y_pred = y_pred
        self.confidence = confidence
        self.losses = losses

    @classmethod
    def from_estimator(cls, estimator, X, y, *, k=9, wrong_only=False, ax=None):
        """Rank images by loss (minus the log-probability of the true class) and draw the top ``k``.

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
        ax : matplotlib Axes or array of Axes, default=None
            See :meth:`plot`.

        Returns
        -------
        display : TopLossesDisplay
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
        embedder = getattr(estimator, "embedder_", None)  # a Pipeline shows the decoded image

        def seen(item):
            # The pixels the model saw: decoded, resized and cropped as they were embedded.
            payload = read_item(item)[1]
            return open_image(payload) if embedder is None else load_pixels(payload, embedder.backbone_.preprocessing)

        display = cls([seen(items[i]) for i in order], order.tolist(), y[order],
                      predicted[order], confidence[order], losses[order])
        return display.plot(ax=ax)  # a cell per image shown: fewer than k when fewer are wrong

    def plot(self, ax=None, n_cells=None):
        """Draw the images in a grid, titled with predicted class (probability), true class and loss.

        Parameters
        ----------
        ax : matplotlib Axes or array of Axes, default=None
            None: a new figure of ``CELL_SIZE`` inches per cell (not attached
            to pyplot). One Axes: its area is divided into the grid, with
            room between the rows for the titles. An array of Axes: one per
            image, at least as many as there are images. Titles take the
            largest font up to 9 points that fits a picture's width (at least
            5 points; lines still too long are cut, ending in "…").
        n_cells : int, default=None
            Cells of the grid (``ceil(sqrt(n_cells))`` columns); by default
            the number of images.

        Returns
        -------
        self : TopLossesDisplay
        """
        n_cells = max(1, n_cells or len(self.images))
        ncols = math.ceil(math.sqrt(n_cells))
        nrows = math.ceil(n_cells / ncols)
        titles = [f"predicted {pred} ({p:.2f})\ntrue {true}, loss {loss:.2f}"
                  for true, pred, p, loss in zip(self.y_true, self.y_pred, self.confidence, self.losses)]
        if ax is None:
            fig = _figure((CELL_SIZE[0] * ncols, CELL_SIZE[1] * nrows))
            axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
            titles, fontsize = _fitted_titles(titles, *CELL_SIZE)
        elif hasattr(ax, "get_subplotspec"):
            # The Axes' area divided into the grid, with room between the rows for each picture's title.
            fig = ax.figure
            box = ax.get_position()
            width = box.width * fig.get_figwidth() / ncols
            height = box.height * fig.get_figheight() / nrows
            titles, fontsize = _fitted_titles(titles, width, height)
            gap = _title_height(fontsize) / 72
            grid = ax.get_subplotspec().subgridspec(nrows, ncols, wspace=0.05, hspace=gap / max(height - gap, 1e-3))
            ax.remove()
            axes = np.array([fig.add_subplot(grid[i // ncols, i % ncols]) for i in range(nrows * ncols)])
        else:
            axes = np.asarray(ax, dtype=object).ravel()
            if len(axes) < len(self.images):
                raise ValueError(f"ax has {len(axes)} axes for {len(self.images)} images; pass at least one "
                                 "per image, a single Axes to divide, or None.")
            fig = axes[0].figure
            box = axes[0].get_position()
            titles, fontsize = _fitted_titles(titles, box.width * fig.get_figwidth(),
                                              box.height * fig.get_figheight())
        for a in axes:
            a.set_axis_off()
        for a, image, title, true, pred in zip(axes, self.images, titles, self.y_true, self.y_pred):
            a.imshow(image)
            a.set_title(title, fontsize=fontsize, color="firebrick" if pred != true else "black")
        if not self.images:
            axes[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center",
                         transform=axes[0].transAxes)
        if ax is None:
            fig.suptitle("Top losses: predicted (probability) / true class", fontsize=11)
        self.figure_, self.axes_ = fig, axes
        return self

    def __getattr__(self, name):
        # Only reached for names the display lacks: savefig, axes, ... of the figure.
        if name.startswith("_") or "figure_" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.figure_, name)


def plot_top_losses(estimator, X, y, k=9, wrong_only=False):
    """A grid of the ``k`` images the classifier got most confidently wrong.

    Images are ranked by their loss (minus the log-probability the model
    gives their true class), highest first; each is titled with the
    predicted class and its probability, the true class and the loss, and
    shown as the model saw it (decoded, resized and cropped by its
    backbone's preprocessing; a Pipeline's images as decoded).
    The same as ``TopLossesDisplay.from_estimator(estimator, X, y, k=k,
    wrong_only=wrong_only)``.

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
    display : TopLossesDisplay
        ``display.figure_`` has ``ceil(sqrt(k))`` columns of ``CELL_SIZE``
        inches each; ``display.indices`` holds the positions in ``X`` of
        the images shown, in order. ``display.savefig(...)`` saves the figure.
    """
    return TopLossesDisplay.from_estimator(estimator, X, y, k=k, wrong_only=wrong_only)


def plot_history(estimator, keys=None):
    """Training curves of the head: loss (and validation metrics) per epoch.

    Parameters
    ----------
    estimator : PretrainedImageClassifier, PretrainedImageRegressor, Pipeline, skorch net or skorch History
        A fitted estimator (its ``history_``), a Pipeline ending in one, a
        skorch net (its ``history``), or a history itself.
    keys : list of str, default=None
        History columns to draw; by default ``train_loss`` and, when recorded
        (``early_stopping=True``), ``valid_loss`` and ``valid_acc``.

    Returns
    -------
    fig : matplotlib.figure.Figure
        Losses on the left axis; accuracies (other scores), when drawn, on a
        right axis, from 0 to 1 when every value lies there; the legend below.
    """
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, Pipeline):
        estimator = estimator.steps[-1][1]  # the step that was trained
    if hasattr(type(estimator), "history_"):
        history = estimator.history_  # NotFittedError before fit
    else:
        history = getattr(estimator, "history", estimator)
    if not (isinstance(history, list) and len(history) and all(isinstance(row, dict) for row in history)):
        raise ValueError(
            "plot_history needs a fitted PretrainedImageClassifier or PretrainedImageRegressor (or a "
            "Pipeline ending in one), a skorch net or a skorch History with at least one epoch; got "
            f"{type(estimator).__name__}."
        )
    recorded = set().union(*(row.keys() for row in history))
    if keys is None:
        keys = [key for key in ("train_loss", "valid_loss", "valid_acc") if key in recorded]
    missing = [key for key in keys if key not in recorded]
    if missing:
        raise ValueError(f"keys {missing} are not in the history; it records {sorted(recorded)}.")
    epochs = history[:, "epoch"]
    from matplotlib.ticker import MaxNLocator

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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a few epochs (L-BFGS) are not ticked 1.25, 1.5
    ax.set_ylabel("loss")
    if right is not None:
        scored = [key for key in keys if not key.endswith("loss")]
        right.set_ylabel("accuracy" if all(key.endswith(("acc", "accuracy")) for key in scored) else "score")
        values = np.concatenate([np.asarray(history[:, key], dtype=float) for key in scored])
        if np.all((values >= 0) & (values <= 1)):
            # Scores of [0, 1] on their whole scale: one validation image more or less
            # right is not drawn as a leap across the axis.
            right.set_ylim(-0.02, 1.02)
    handles = ax.get_lines() + (right.get_lines() if right is not None else [])
    # Below the plot, where it covers no curve.
    ax.legend(handles, [h.get_label() for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.16),
              ncols=len(handles), frameon=False)
    ax.set_title("Head training")
    fig.tight_layout()
    return fig
