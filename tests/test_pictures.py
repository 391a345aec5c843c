"""Pictures: top losses, training curves and Grad-CAM, each rendered to a real PNG."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.exceptions import NotFittedError
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

from sktransfer import (ImageEmbedder, PretrainedImageClassifier, PretrainedImageRegressor, TopLossesDisplay, explain,
                        plot_history, plot_top_losses)
from sktransfer._backbones import build_backbone

from conftest import subset, SAMPLE


def png(figure_or_image, **savefig):
    """Render to PNG bytes and decode them again, as a viewer would."""
    buffer = io.BytesIO()
    if isinstance(figure_or_image, Image.Image):
        figure_or_image.save(buffer, format="PNG")
    else:
        figure_or_image.savefig(buffer, format="png", **savefig)
    image = Image.open(io.BytesIO(buffer.getvalue()))
    image.load()
    assert image.format == "PNG"
    return image


@pytest.fixture(scope="module")
def data():
    train = subset(SAMPLE, 6, ["cardboard", "glass", "metal"])
    test = subset(SAMPLE, 4, ["cardboard", "glass", "metal"], offset=10)
    return train, test


@pytest.fixture(scope="module")
def clf(data):
    (X, y), _ = data
    return PretrainedImageClassifier(max_epochs=15, random_state=0).fit(X, y)


def test_plot_top_losses_shows_the_highest_losses_first(clf, data):
    _, (X, y) = data
    proba = clf.predict_proba(X)
    sure = int(proba.max(axis=1).argmax())
    y = y.copy()
    y[sure] = clf.classes_[proba[sure].argmin()]  # mislabel the surest photo: confidently wrong
    fig = plot_top_losses(clf, X, y, k=4)
    image = png(fig, dpi=50)
    assert image.size == (2 * 150, 2 * 165)  # 2 x 2 cells of 3 x 3.3 inches at 50 dpi
    assert np.asarray(image.convert("L")).std() > 10

    true = [list(clf.classes_).index(v) for v in y]
    losses = -np.log(np.clip(proba[np.arange(len(y)), true], 1e-12, None))
    assert fig.indices == np.argsort(-losses, kind="stable")[:4].tolist()
    assert sure in fig.indices  # the mislabelled photo is among the worst
    title = fig.axes[fig.indices.index(sure)].get_title()
    assert f"true {y[sure]}, loss {losses[sure]:.2f}" in title
    assert f"predicted {clf.classes_[proba[sure].argmax()]}" in title

    only_wrong = plot_top_losses(clf, X, y, k=9, wrong_only=True)
    wrong = np.flatnonzero(clf.predict(X) != y)
    assert sorted(only_wrong.indices) == sorted(wrong.tolist())
    # A cell per image shown, not k of them mostly blank (the evaluate report's picture).
    columns = int(np.ceil(np.sqrt(len(wrong))))
    assert png(only_wrong, dpi=40).size == (columns * 120, int(np.ceil(len(wrong) / columns)) * 132)
    right = np.flatnonzero(clf.predict(X) == y)
    one = plot_top_losses(clf, [X[i] for i in [*right[:5], wrong[0]]], y[[*right[:5], wrong[0]]], k=9, wrong_only=True)
    assert len(one.images) == 1 and png(one, dpi=40).size == (120, 132)


def test_plot_top_losses_rejects_labels_the_model_does_not_know(clf, data):
    _, (X, y) = data
    with pytest.raises(ValueError, match="labels the model does not know: 'paper'"):
        plot_top_losses(clf, X[:2], ["paper", "cardboard"])
    with pytest.raises(ValueError, match="k=0"):
        plot_top_losses(clf, X, y, k=0)


def test_plot_top_losses_names_models_without_one_class_per_image(data):
    (X, y), _ = data
    indicator = np.array([[label == "glass", label != "metal"] for label in y], dtype=int)
    multilabel = PretrainedImageClassifier(max_epochs=2, random_state=0).fit(X, indicator)
    with pytest.raises(ValueError, match="multi-label"):
        plot_top_losses(multilabel, X, indicator, k=2)
    regressor = PretrainedImageRegressor(max_epochs=2, random_state=0).fit(X, np.arange(len(X), dtype=float))
    with pytest.raises(ValueError, match="PretrainedImageRegressor"):
        plot_top_losses(regressor, X, np.arange(len(X), dtype=float), k=2)


def test_plot_history_draws_the_recorded_curves(clf, data):
    image = png(plot_history(clf), dpi=50)
    assert image.size == (320, 200)  # 6.4 x 4 inches at 50 dpi
    fig = plot_history(clf)
    (line,) = fig.axes[0].get_lines()
    np.testing.assert_allclose(line.get_ydata(), clf.history_[:, "train_loss"])
    assert list(line.get_xdata()) == list(range(1, len(clf.history_) + 1))  # one point per epoch
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if 1 <= t <= len(clf.history_)]
    assert ticks and all(float(t).is_integer() for t in ticks)  # epochs are counted, never 1.5

    (X, y), _ = data
    stopped = PretrainedImageClassifier(max_epochs=6, early_stopping=True, validation_fraction=0.34,
                                        random_state=0).fit(X, y)
    fig = plot_history(stopped)
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert labels == ["train_loss", "valid_loss", "valid_acc"]
    assert png(fig, dpi=50).size == (320, 200)
    # Accuracy on its whole scale: a photo more or less right on a small validation
    # set is not drawn as a leap across the axis.
    accuracy_axis = fig.axes[1]
    assert accuracy_axis.get_ylabel() == "accuracy"
    low, high = accuracy_axis.get_ylim()
    assert low <= 0.0 and 1.0 <= high < 1.1
    # The legend covers no curve: it sits outside the plotting area.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    legend = fig.legends[0] if fig.legends else fig.axes[0].get_legend()
    assert not legend.get_window_extent(renderer).overlaps(fig.axes[0].get_window_extent(renderer))
    with pytest.raises(ValueError, match="keys \\['valid_acc'\\] are not in the history"):
        plot_history(clf, keys=["valid_acc"])
    with pytest.raises(NotFittedError):
        plot_history(PretrainedImageClassifier())
    # A fitted Pipeline ending in one of sktransfer's estimators: that estimator's history.
    from sklearn.pipeline import make_pipeline

    pipeline = make_pipeline(stopped)
    labels = [line.get_label() for ax in plot_history(pipeline).axes for line in ax.get_lines()]
    assert labels == ["train_loss", "valid_loss", "valid_acc"]
    with pytest.raises(ValueError, match="a fitted PretrainedImageClassifier or PretrainedImageRegressor"):
        plot_history(make_pipeline(ImageEmbedder()))


def test_confusion_matrix_through_sklearn_display(clf, data):
    from matplotlib.figure import Figure

    _, (X, y) = data
    fig = Figure(figsize=(4, 4))
    display = ConfusionMatrixDisplay.from_estimator(clf, X, y, ax=fig.subplots(), colorbar=False)
    assert display.confusion_matrix.sum() == len(X)  # X: image paths, as for any classifier
    np.testing.assert_array_equal(display.confusion_matrix, confusion_matrix(y, clf.predict(X)))
    assert list(display.display_labels) == list(clf.classes_)
    assert png(fig, dpi=50).size == (200, 200)


def test_top_losses_display_follows_sklearn_display_conventions(clf, data):
    from matplotlib.figure import Figure

    _, (X, y) = data
    display = TopLossesDisplay.from_estimator(clf, X, y, k=4)
    assert display.indices == plot_top_losses(clf, X, y, k=4).indices
    titles = [ax.get_title() for ax in display.axes_[:4]]
    assert len(display.images) == 4 and display.figure_ is display.axes_[0].figure

    fig = Figure(figsize=(8, 4))
    left, right = fig.subplots(1, 2)
    assert display.plot(ax=right) is display  # one Axes: its area becomes the 2 x 2 grid
    assert display.figure_ is fig and left in fig.axes and right not in fig.axes
    assert [ax.get_title() for ax in display.axes_] == titles
    assert np.asarray(display.axes_[0].get_images()[0].get_array()).shape[2] == 3  # the photo itself
    cells = Figure().subplots(1, 4)
    display.plot(ax=cells)  # one Axes per image
    assert list(display.axes_) == list(cells) and [ax.get_title() for ax in cells] == titles
    with pytest.raises(ValueError, match="ax has 2 axes for 4 images"):
        display.plot(ax=cells[:2])
    assert png(display, dpi=20).size == (128, 96)  # savefig reaches the figure, as before the display


@pytest.mark.parametrize("figsize", [(8, 4), (12, 9), (6.4, 4.8), (4, 3)])
def test_top_losses_titles_stay_clear_of_the_other_pictures_in_one_axes(clf, data, figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _, (X, y) = data
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    _, right = fig.subplots(1, 2)
    display = TopLossesDisplay.from_estimator(clf, X, y, k=9, ax=right)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    cells = [ax.get_window_extent(renderer) for ax in display.axes_]
    titles = [ax.title.get_window_extent(renderer) for ax in display.axes_]
    full = [f"predicted {pred} ({p:.2f})\ntrue {true}, loss {loss:.2f}" for true, pred, p, loss in
            zip(display.y_true, display.y_pred, display.confidence, display.losses)]
    for ax, text in zip(display.axes_, full):  # whole, or cut where too long for the picture's width
        for shown, line in zip(ax.get_title().splitlines(), text.splitlines(), strict=True):
            assert shown == line or (shown.endswith("…") and line.startswith(shown[:-1]) and len(shown) > 5)
    if figsize == (12, 9):
        assert [ax.get_title() for ax in display.axes_] == full
    for i, title in enumerate(titles):
        assert title.height > 0 and ax_font(display.axes_[i]) >= 5
        for j, (cell, other) in enumerate(zip(cells, titles)):
            if j != i:
                assert not title.overlaps(cell), f"title {i} over picture {j}"
                assert not title.overlaps(other), f"title {i} over title {j}"


def ax_font(ax):
    return ax.title.get_fontsize()


def test_explain_gives_gradcam_overlays_where_the_photo_is(clf, data):
    _, (X, y) = data
    photo = Image.open(X[4]).convert("RGB").resize((112, 224))  # a glass photo
    half = Image.new("RGB", (224, 224), (128, 128, 128))
    half.paste(photo, (0, 0))  # the photo on the left, flat grey on the right
    overlays, heatmaps = explain(clf, [X[0], half], return_heatmaps=True)
    assert len(overlays) == 2 and heatmaps.shape == (2, 224, 224)  # the backbone's 224 px crop
    for overlay in overlays:
        assert png(overlay).size == (224, 224) and overlay.mode == "RGB"
    assert heatmaps.min() >= 0 and heatmaps.max() == pytest.approx(1.0)
    assert heatmaps[0].std() > 0.05  # a map, not a constant
    # The class evidence sits in the photo, not in the flat grey half.
    assert heatmaps[1][:, :112].sum() > 2 * heatmaps[1][:, 112:].sum()

    others = [c for c in clf.classes_ if c != clf.predict(X[:1])[0]]
    _, other = explain(clf, X[:1], target=others[0], return_heatmaps=True)
    assert not np.allclose(other[0], heatmaps[0])
    plain = explain(clf, X[:1], alpha=0.0)[0]
    crop = clf.embedder_.backbone_.preprocessing.to_array(Image.open(X[0]).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(plain), crop)  # alpha=0: the image as the backbone sees it


def test_explain_and_top_losses_show_the_pixels_the_features_came_from(clf, data, tmp_path):
    from sktransfer._images import load_pixels

    _, (X, y) = data
    big = tmp_path / "big.jpg"  # large enough for a reduced-scale JPEG decode
    Image.open(X[0]).convert("RGB").resize((1600, 1200)).save(big, quality=92)
    prep = clf.embedder_.backbone_.preprocessing
    embedded = load_pixels(str(big), prep)
    full = prep.to_array(Image.open(big).convert("RGB"))
    assert not np.array_equal(embedded, full)  # so the checks below tell the two apart
    np.testing.assert_array_equal(np.asarray(explain(clf, [str(big)], alpha=0.0)[0]), embedded)
    fig = plot_top_losses(clf, [str(big)], y[:1], k=1)
    np.testing.assert_array_equal(np.asarray(fig.axes[0].images[0].get_array()), embedded)


def test_explain_leaves_the_frozen_backbone_untouched(clf, data):
    _, (X, _) = data
    module = clf.embedder_.backbone_.module
    before = {k: v.clone() for k, v in module.state_dict().items()}
    features = clf.embedder_.transform(X[:2])
    explain(clf, X[:2])
    assert module is build_backbone("efficientnet_lite0").module  # still the shared body
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert not any(p.requires_grad for p in module.parameters()) and not module.training
    assert all(p.grad is None for p in module.parameters())
    from sktransfer import clear_cache

    clear_cache()
    # Recomputed in a batch of 2 rather than within the batch of fit: equal up to float rounding.
    np.testing.assert_allclose(clf.embedder_.transform(X[:2]), features, rtol=1e-5, atol=1e-5)


def test_explain_needs_a_fitted_cnn_and_known_targets(clf, data):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from sktransfer import ImageEmbedder, PretrainedImageRegressor

    (X, y), _ = data
    with pytest.raises(NotFittedError):
        explain(PretrainedImageClassifier(), X[:1])
    # Anything else is told as such, fitted or not (a Pipeline of features had said "not fitted").
    for other in [make_pipeline(ImageEmbedder(), LogisticRegression()).fit(X, y), ImageEmbedder().fit(),
                  PretrainedImageRegressor(max_epochs=2).fit(X, np.arange(len(X), dtype=float))]:
        with pytest.raises(TypeError, match=f"^explain needs a fitted PretrainedImageClassifier, got "
                                            f"{type(other).__name__}"):
            explain(other, X[:1])
    with pytest.raises(ValueError, match="'paper' is not a class of the model"):
        explain(clf, X[:1], target="paper")
    with pytest.raises(ValueError, match="target has 2 labels for 1 images"):
        explain(clf, X[:1], target=["cardboard", "metal"])

    class Flat(torch.nn.Module):  # a backbone with no spatial feature map
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    flat = PretrainedImageClassifier(Flat(), max_epochs=2, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="no spatial feature map"):
        explain(flat, X[:1])


def test_explain_names_what_it_cannot_explain(sample):
    paths, labels = sample
    X, y = paths[:3] + paths[30:33], labels[[0, 1, 2, 30, 31, 32]]
    tuned = PretrainedImageClassifier(unfreeze=1, max_epochs=1, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="unfreeze=1"):
        explain(tuned, X[:1])
