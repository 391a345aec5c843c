"""sktransfer.audit and `sktransfer audit`: real photos with injected faults."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import KFold, cross_val_predict

from sktransfer import PretrainedImageClassifier, audit, clear_cache, load_image_folder
from sktransfer._audit import HASH_DISTANCE, confident_label_issues, duplicate_components, perceptual_hash
from sktransfer._backbones import build_backbone
from sktransfer._cli import main
from sktransfer._inputs import read_item

from conftest import ForwardCounter, dataset

PER_CLASS = 24


def reencoded(source, target, quality=None, scale=None):
    """A copy of a photo, re-encoded as JPEG at ``quality`` and/or resized by ``scale``."""
    image = Image.open(source).convert("RGB")
    if scale:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    image.save(target, "JPEG", quality=quality or 90)
    return str(target)


def blank_frame(target):
    """A picture from no class: an all-black frame, as a camera with its lens cap on takes."""
    Image.new("RGB", (256, 256), "black").save(target)
    return str(target)


@pytest.fixture(scope="module")
def faulty(sample, tmp_path_factory):
    """Sample photos with 3 flipped labels, 4 duplicates, a blank frame and a test set leaking one photo."""
    tmp = tmp_path_factory.mktemp("audit")
    paths, labels = sample
    classes = sorted(set(labels))
    keep = [i for c in classes for i in np.flatnonzero(labels == c)[:PER_CLASS]]
    folds = KFold(3, shuffle=True, random_state=0)  # the same folds before and after the flips
    X, y = [paths[i] for i in keep], labels[keep].copy()
    clear_cache()
    with ForwardCounter(build_backbone("efficientnet_lite0").module) as counter:
        # A label error can be found only in a photo whose true class the model recognises:
        # flip 3 photos that a clean cross-validation classifies right with confidence.
        clean = cross_val_predict(PretrainedImageClassifier(random_state=0), X, y, cv=folds, method="predict_proba")
        recognised = np.flatnonzero(clean[np.arange(len(y)), np.searchsorted(classes, y)] > 0.8)
        flipped = np.random.default_rng(0).choice(recognised, 3, replace=False)
        for i in flipped:
            y[i] = classes[int(np.argmin(clean[i]))]  # the class the photo looks least like
        originals = [i for i in range(len(X)) if i not in flipped][1:13:3]  # 4 photos kept with their label
        copies = [
            reencoded(X[originals[0]], tmp / "q40.jpg", quality=40),
            reencoded(X[originals[1]], tmp / "half.jpg", scale=0.5),
            reencoded(X[originals[2]], tmp / "small.jpg", quality=70, scale=0.75),
            str(shutil.copy(X[originals[3]], tmp / "exact.jpg")),
        ]
        X += copies
        y = np.concatenate([y, y[originals]])
        outlier = len(X)
        X.append(blank_frame(tmp / "blank.png"))
        y = np.append(y, classes[0])
        # The test set: photos not in X, and one photo of X re-encoded.
        others = [i for c in classes for i in np.flatnonzero(labels == c)[PER_CLASS:PER_CLASS + 2]]
        leaked = next(i for i in range(len(keep)) if i not in originals and i not in flipped)
        X_test = [paths[i] for i in others] + [reencoded(X[leaked], tmp / "leaked.jpg", quality=60)]
        y_test = np.append(labels[others], y[leaked])
        before = counter.images
        report = audit(PretrainedImageClassifier(random_state=0), X, y, cv=folds, X_test=X_test, y_test=y_test)
        passes = before, counter.images
    return dict(report=report, n_photos=len(keep), X=X, y=y, X_test=X_test, flipped=set(flipped.tolist()), passes=passes,
                pairs=list(zip(originals, range(outlier - 4, outlier))), outlier=outlier, leaked=leaked)


def test_backbone_runs_once_per_image(faulty):
    before, after = faulty["passes"]
    distinct = {read_item(item)[0] for item in faulty["X"] + faulty["X_test"]}
    assert after == len(distinct)  # the exact copy shares its twin's cached features
    assert before == faulty["n_photos"]  # the sample photos were embedded before the audit, and cached


def test_flipped_labels_ranked_on_top(faulty):
    report = faulty["report"]
    # The photos of the small bundled sample also hold confidently misclassified ones (about
    # 60% out-of-fold accuracy), so the flips must be among the top tenth, not the top three.
    ranks = [report.label_issues.tolist().index(i) for i in faulty["flipped"]]
    assert max(ranks) < len(faulty["X"]) / 10, ranks
    assert np.all(np.diff(report.label_scores) <= 0)
    for i, suggested in zip(report.label_issues, report.suggested_labels):
        assert suggested != faulty["y"][i]


def test_duplicates_grouped(faulty):
    report = faulty["report"]
    groups = [set(g.tolist()) for g in report.duplicate_groups]
    for original, copy in faulty["pairs"]:
        assert any({original, copy} <= g for g in groups), (original, copy)
    assert report.duplicate_scores[faulty["pairs"][-1][1]] == 1.0  # the byte-identical copy
    # "auto" adapts the threshold to the folder, between its distinct photos and the copies.
    assert 0.5 < report.duplicate_threshold < min(report.duplicate_scores[c] for _, c in faulty["pairs"])
    assert sum(len(g) for g in report.duplicate_groups) < 2 * len(faulty["pairs"]) + 4


@pytest.mark.parametrize("name", ["trash_sample", "sign_digits"])
def test_perceptual_hash_joins_copies_not_distinct_photos(name, sample, tmp_path):
    """Re-encoded and resized copies join their original; distinct photos, even of one class, stay apart.

    The features are kept out (orthogonal, threshold 1): the hash alone decides.
    sign_digits is the hard case: its hands on one white wall look more alike
    to the backbone than a photo and its JPEG copy at quality 50 do.
    """
    if name == "trash_sample":
        paths = sample[0][::3]
    else:
        paths, labels = load_image_folder(dataset(name))
        paths = [paths[i] for i in np.flatnonzero(labels == labels[0])[:60]]  # distinct photos of one class
    copies = [reencoded(paths[0], tmp_path / "q50.jpg", quality=50),
              reencoded(paths[1], tmp_path / "half.jpg", scale=0.5),
              reencoded(paths[2], tmp_path / "both.jpg", quality=50, scale=0.5)]
    X = list(paths) + copies
    hashes = np.array([perceptual_hash(Image.open(p)) for p in X])
    assert hashes.shape == (len(X), 255)
    components, _ = duplicate_components(np.eye(len(X)), [read_item(p)[0] for p in X], hashes, 1.0)
    n = len(paths)
    assert [components[i] == components[n + i] for i in range(3)] == [True] * 3
    assert len(set(components[:n].tolist())) == n  # no two distinct photos merged
    distance = (hashes[:n, None] != hashes[None, :n]).sum(axis=2) + 255 * np.eye(n, dtype=int)
    assert distance.min() > 1.5 * HASH_DISTANCE  # with a margin


def test_leakage_across_the_split_found(faulty):
    report = faulty["report"]
    n_test = len(faulty["X_test"])
    assert [(t.tolist(), s.tolist()) for t, s in report.leakage_groups] == [([faulty["leaked"]], [n_test - 1])]


def test_outlier_from_another_domain_flagged(faulty):
    report = faulty["report"]
    assert report.outliers[0] == faulty["outlier"]
    assert report.outlier_scores[0] > 1, report.outlier_scores
    # The photos themselves are not outliers, but for a few near the fences.
    assert len(report.outliers) <= 3


def test_frame_and_cleaned_data(faulty):
    report, X, y = faulty["report"], faulty["X"], faulty["y"]
    frame = report.to_frame()
    assert list(frame.columns) == ["path", "finding", "given_label", "suggested_label", "score", "group"]
    assert set(frame["finding"]) == {"label_issue", "duplicate", "leakage", "outlier"}
    issues = frame[frame.finding == "label_issue"]
    assert issues["path"].tolist() == [X[i] for i in report.label_issues]
    assert issues["group"].isna().all()
    leak = frame[frame.finding == "leakage"]
    assert leak["path"].tolist() == [X[faulty["leaked"]], faulty["X_test"][-1]] and leak["group"].nunique() == 1

    X_clean, y_clean = report.cleaned()
    removed = set(X) - set(X_clean)
    assert {X[i] for i in faulty["flipped"]} <= removed
    assert X[faulty["outlier"]] in removed and X[faulty["leaked"]] in removed
    for original, copy in faulty["pairs"]:
        assert (X[original] in X_clean) != (X[copy] in X_clean)  # one of each pair stays
    assert len(X_clean) == len(y_clean)
    outliers = set(report.outliers.tolist())
    assert report.cleaned(drop="outlier")[0] == [x for i, x in enumerate(X) if i not in outliers]
    with pytest.raises(ValueError, match="drop="):
        report.cleaned(drop=["typo"])


def test_confident_learning_thresholds():
    # Class 0's images have p0 = 0.9, 0.8, 0.1: its threshold is their mean, 0.6.
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.3, 0.7], [0.35, 0.65]])
    y = np.array([0, 0, 0, 1, 1])
    indices, suggested, scores, thresholds = confident_label_issues(y, proba)
    np.testing.assert_allclose(thresholds, [0.6, (0.7 + 0.65) / 2])
    assert indices.tolist() == [2] and suggested.tolist() == [1]
    np.testing.assert_allclose(scores, [0.9])


def test_cli_writes_report_and_findings(sample, tmp_path):
    paths, labels = sample
    data, test = tmp_path / "photos", tmp_path / "test"
    classes = sorted(set(labels))[:2]
    for c in classes:
        for p in [p for p, lab in zip(paths, labels) if lab == c][:6]:
            (data / c).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, data / c / Path(p).name)
    # A class name a spreadsheet would run, and a file name with markup, both duplicated.
    odd = data / "=HYPERLINK(1)"
    odd.mkdir()
    first = next((data / classes[0]).iterdir())
    for k, p in enumerate(sorted((data / classes[1]).iterdir())[:3]):
        reencoded(p, odd / f"{k}.jpg", quality=70)
    shutil.copy(first, data / classes[0] / "<b>copy.jpg")
    (test / classes[0]).mkdir(parents=True)
    reencoded(first, test / classes[0] / "leak.jpg", quality=60)

    out = tmp_path / "audit"
    assert main(["audit", str(data), "-o", str(out), "--test", str(test), "--cv", "3"]) == 0
    with open(out / "findings.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "finding", "given_label", "suggested_label", "score", "group"]
    assert {r["finding"] for r in rows} <= {"label_issue", "duplicate", "leakage", "outlier"}
    leak = [r for r in rows if r["finding"] == "leakage"]
    assert {Path(r["path"]).name for r in leak} == {first.name, "<b>copy.jpg", "leak.jpg"}
    assert not any(r[k].startswith(("=", "+", "-", "@")) for r in rows for k in r)
    assert "'=HYPERLINK(1)" in {r["given_label"] for r in rows}
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "&lt;b&gt;copy.jpg" in page and "<b>copy.jpg" not in page
    assert page.count("data:image/jpeg;base64,") == len(rows)
    assert not list(out.glob(".*.tmp"))  # written through temporary files, none left behind


@pytest.mark.parametrize("kwargs, message", [
    (dict(y=["a"] * 5), "one label per image"),
    (dict(cv=20), "fewer than cv=20"),
    (dict(cv=1), "at least 2"),
    (dict(duplicate_threshold=1.5), "duplicate_threshold"),
    (dict(duplicate_threshold="high"), "duplicate_threshold"),
    (dict(n_neighbors=0), "n_neighbors"),
    (dict(X_test=["missing.jpg"], y_test=["a", "b"]), "y_test"),
    (dict(y=["a"] * 12), "at least 2 classes"),
])
def test_bad_input_errors_before_any_work(sample, kwargs, message):
    X, y = sample[0][:12], np.repeat(["a", "b"], 6)
    arguments = {"X": X, "y": y, **kwargs}
    with ForwardCounter(build_backbone("efficientnet_lite0").module) as counter:
        with pytest.raises(ValueError, match=message):
            audit(PretrainedImageClassifier(), **arguments)
        assert counter.images == 0


def test_estimator_must_be_an_image_classifier(sample):
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(TypeError, match="PretrainedImageClassifier"):
        audit(LogisticRegression(), sample[0][:12], np.repeat(["a", "b"], 6))


def test_cli_reports_a_missing_folder(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")]) == 1
    assert "nowhere" in capsys.readouterr().err
