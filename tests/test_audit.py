"""sktransfer.audit and `sktransfer audit`: real photos with injected faults."""

import copy
import csv
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import GroupKFold, KFold, cross_val_predict

from sktransfer import PretrainedImageClassifier, audit, clear_cache, load_image_folder
from sktransfer._audit import (
    COLUMNS, FINDINGS, HASH_DISTANCE, MANY_SUSPECTS, calibrated_joint, class_outliers, combine_evidence,
    confident_joint, duplicate_components, find_label_issues, label_conflicts, log_ratio, neighbour_proba,
    normalized_margin, perceptual_hash)
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


def unit_features(X):
    """The default backbone's features of ``X``, scaled to unit length, as the audit sees them."""
    features = PretrainedImageClassifier(random_state=0)._make_embedder().fit().transform(X)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def test_label_issues_weigh_the_neighbours_vote(faulty):
    report, X, y = faulty["report"], faulty["X"], faulty["y"]
    n, n_classes = len(X), len(report.classes)
    y_enc = np.searchsorted(report.classes, y)
    k = round(np.sqrt(n))
    # The vote of each photo's k most similar photos, leaving out itself and its duplicates.
    votes = report.neighbour_proba * (k + n_classes) - 1
    np.testing.assert_allclose(votes, np.round(votes), atol=1e-9)
    np.testing.assert_allclose(votes.sum(axis=1), k)
    group = np.arange(n)
    for members in report.duplicate_groups:
        group[members] = members[0]
    similarity = unit_features(X) @ unit_features(X).T
    similarity[group[:, None] == group[None, :]] = -np.inf
    nearest = np.argsort(-similarity, axis=1, kind="stable")
    for i in range(n):
        ranked = similarity[i, nearest[i]]
        if ranked[k - 1] - ranked[k] > 1e-6:  # no tie at the k-th neighbour
            np.testing.assert_array_equal(np.round(votes[i]), np.bincount(y_enc[nearest[i, :k]], minlength=n_classes))
    # Label issues are found on the head's out-of-fold evidence and the vote together.
    np.testing.assert_allclose(report.label_proba, combine_evidence(report.oof_proba, report.neighbour_proba))
    np.testing.assert_allclose(report.label_scores, log_ratio(y_enc, report.label_proba)[report.label_issues])
    assert report.label_issues.tolist() == find_label_issues(y_enc, report.label_proba)[0].tolist()


def test_a_copy_does_not_vote_for_its_twins_label(sample, tmp_path):
    """A mislabelled photo filed twice: its copy's (equally wrong) label must not back it up."""
    paths, labels = sample
    classes = sorted(set(labels))
    X = [p for c in classes for p in [q for q, lab in zip(paths, labels) if lab == c][:10]]
    y = np.searchsorted(classes, [lab for c in classes for lab in [c] * 10])
    X.append(str(shutil.copy(X[0], tmp_path / "twin.jpg")))
    unit = unit_features(X)
    # The first photo's own label is not in its vote: file it (and its copy) under the class it has fewest votes of.
    alone = neighbour_proba(unit[:-1], y, len(classes), np.arange(len(X) - 1), k=5)[0]
    wrong = int(np.argmin(np.where(np.arange(len(classes)) == y[0], np.inf, alone)))
    y[0] = wrong
    y = np.append(y, wrong)
    grouped = np.arange(len(X))
    grouped[-1] = 0
    with_twin = neighbour_proba(unit, y, len(classes), grouped, k=5)
    np.testing.assert_allclose(with_twin[0], alone)  # as if the copy were not there
    # Had the copy not been known as one, it would have voted for the wrong label, first of all.
    unknown = neighbour_proba(unit, y, len(classes), np.arange(len(X)), k=5)[0]
    assert unknown[wrong] > alone[wrong]
    # By default the vote is of round(sqrt(n)) neighbours, Laplace-smoothed: (votes + 1) / (k + classes).
    default = neighbour_proba(unit, y, len(classes), grouped)
    np.testing.assert_allclose(default.sum(axis=1), 1.0)
    assert default.min() >= 1 / (round(np.sqrt(len(X))) + len(classes)) - 1e-12


def test_copies_stay_in_one_fold(sample, tmp_path):
    """A mislabelled photo filed four times: no copy may teach the head the wrong label for another.

    With the copies spread over the folds, the model that predicts one copy
    is trained on the others, and learns their shared wrong label; kept in
    one fold, they are predicted by a model that saw none of them.
    """
    paths, labels = sample
    classes = sorted(set(labels))
    X = [p for c in classes for p in [q for q, lab in zip(paths, labels) if lab == c][:12]]
    y = np.array([c for c in classes for _ in range(12)])
    twins = [str(shutil.copy(X[0], tmp_path / f"twin{k}.jpg")) for k in range(3)]
    X += twins
    y[0] = classes[1]  # photo 0 is filed under the wrong class, and so are its three copies
    y = np.append(y, [classes[1]] * 3)
    group = [0, len(X) - 3, len(X) - 2, len(X) - 1]
    for cv in (5, GroupKFold(4)):  # a splitter that takes groups is given the duplicate groups
        report = audit(PretrainedImageClassifier(random_state=0), X, y, cv=cv)
        assert any(set(group) == set(members.tolist()) for members in report.duplicate_groups)
        # One model predicted the four (same features, same row), and it disagrees with their label.
        np.testing.assert_allclose(report.oof_proba[group], np.tile(report.oof_proba[0], (4, 1)))
        assert set(group) <= set(report.label_issues.tolist()), report.oof_proba[group]


def test_neighbour_vote_with_nothing_left_to_vote():
    """Images all duplicates of each other have no neighbour to ask: the vote says nothing (uniform)."""
    unit = np.tile([[0.6, 0.8]], (4, 1))
    votes = neighbour_proba(unit, np.array([0, 1, 1, 2]), 3, np.zeros(4, dtype=int))
    np.testing.assert_allclose(votes, 1 / 3)
    # One image apart from a group of three: it is the only vote the group's images get, and k shrinks to 1.
    votes = neighbour_proba(unit, np.array([0, 1, 1, 2]), 3, np.array([0, 0, 0, 1]))
    np.testing.assert_allclose(votes[:3], [[0.25, 0.25, 0.5]] * 3)


def _with_a_large_group(n_single, n_group, seed=0):
    """Unit vectors in 3-d: ``n_single`` distinct images and one duplicate group of ``n_group`` copies."""
    rng = np.random.default_rng(seed)
    unit = rng.normal(size=(n_single + 1, 3))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    unit = np.vstack([unit, np.tile(unit[-1], (n_group - 1, 1))])
    components = np.concatenate([np.arange(n_single), np.full(n_group, n_single)])
    y = rng.integers(0, 3, size=len(unit))
    y[n_single:] = y[n_single]  # the copies are filed alike: their order among ties does not matter
    return unit, components, y


def test_neighbour_vote_beside_a_large_duplicate_group():
    unit, components, y = _with_a_large_group(300, 60)
    votes = neighbour_proba(unit, y, 3, components)
    k = round(np.sqrt(len(unit)))
    similarity = unit @ unit.T
    similarity[components[:, None] == components[None, :]] = -np.inf
    for i in range(len(unit)):
        nearest = np.argsort(-similarity[i], kind="stable")[:k]
        np.testing.assert_allclose(votes[i], (np.bincount(y[nearest], minlength=3) + 1) / (k + 3))


def test_a_large_duplicate_group_costs_only_its_own_queries():
    """5,000 distinct images and 1,000 copies of one: the other images' neighbour
    queries do not grow with the group (they asked for k + 1,000 neighbours each)."""
    import tracemalloc

    from sktransfer._audit import class_outliers

    unit, components, y = _with_a_large_group(5000, 1000)
    for analysis in (lambda: neighbour_proba(unit, y, 3, components),
                     lambda: class_outliers(unit, y, 3, components, 5)):
        tracemalloc.start()
        try:
            analysis()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 100e6, peak  # 218 and 296 MB when every query asked for the largest group


def test_combined_evidence_averages_the_log_ratios():
    rng = np.random.default_rng(0)
    proba, votes = rng.dirichlet(np.ones(2), size=20), rng.dirichlet(np.ones(2), size=20)
    y = rng.integers(0, 2, size=20)
    combined = combine_evidence(proba, votes)
    np.testing.assert_allclose(combined.sum(axis=1), 1.0)
    np.testing.assert_allclose(log_ratio(y, combined), (log_ratio(y, proba) + log_ratio(y, votes)) / 2)
    # A head unsure of an image (0.45 for its label) is outvoted by neighbours sure of another class.
    assert find_label_issues(np.array([0, 0]), combine_evidence(
        np.array([[0.45, 0.55], [0.3, 0.7]]), np.array([[0.05, 0.95], [0.6, 0.4]])), flag="all")[0].tolist() == [0, 1]


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
    assert list(frame.columns) == ["path", "finding", "given_label", "suggested_label", "score", "group", "split"]
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
    X_unique, _ = report.cleaned(drop="duplicate")
    for original, copy in faulty["pairs"]:
        assert (X[original] in X_unique) != (X[copy] in X_unique)  # one of each pair stays
    assert y_clean.tolist() == [y[X.index(x)] for x in X_clean]
    outliers = set(report.outliers.tolist())
    assert report.cleaned(drop="outlier")[0] == [x for i, x in enumerate(X) if i not in outliers]
    with pytest.raises(ValueError, match="drop="):
        report.cleaned(drop=["typo"])


@pytest.fixture(scope="module")
def filed_twice(sample, tmp_path_factory):
    """The sample with photos filed under two classes, and a test set holding one of its very files.

    Two paper photos are copied into cardboard (listed first, as a class
    folder sorts them): one the model knows well as paper, and one checked
    against the rule only. A third paper photo, itself left out, is filed
    once as cardboard and once as glass.
    """
    tmp = tmp_path_factory.mktemp("filed_twice")
    paths, labels = sample
    known, second, elsewhere = (next(i for i, p in enumerate(paths) if Path(p).name == name)
                                for name in ("paper146.jpg", "paper164.jpg", "paper161.jpg"))
    copies = [str(shutil.copy(paths[i], tmp / f"{Path(paths[i]).stem}_dup.jpg")) for i in (known, second)]
    filed = [str(shutil.copy(paths[elsewhere], tmp / f"paper161_{c}.jpg")) for c in ("cb", "gl")]
    rest = [i for i in range(len(paths)) if i != elsewhere]
    X = copies + [paths[i] for i in rest] + filed
    y = np.concatenate([["cardboard"] * 2, labels[rest], ["cardboard", "glass"]])
    X_test = [paths[0]]  # the same file as one of X
    report = audit(PretrainedImageClassifier(random_state=0), X, y, cv=5, X_test=X_test, y_test=labels[:1])
    return dict(report=report, X=X, y=y, X_test=X_test, known=(0, X.index(paths[known])),
                second=(1, X.index(paths[second])), elsewhere=(len(X) - 2, len(X) - 1))


def _group_of(report, i):
    return next(members.tolist() for members in report.duplicate_groups if i in members)


def test_a_photo_filed_under_two_classes_is_a_label_issue(filed_twice):
    report, X, y = filed_twice["report"], filed_twice["X"], filed_twice["y"]
    issues = dict(zip(report.label_issues.tolist(), report.suggested_labels.tolist()))
    scores = dict(zip(report.label_issues.tolist(), report.label_scores.tolist()))
    conflicting = [filed_twice["known"], filed_twice["second"], filed_twice["elsewhere"]]
    for group in conflicting:
        assert _group_of(report, group[0]) == list(group)
        # The group's summed evidence names its likely class: the copies filed under another are label issues.
        proba = report.label_proba[list(group)].sum(axis=0)
        likely = proba.argmax()
        for i in group:
            if y[i] == report.classes[likely]:
                assert i not in issues
            else:
                assert issues[i] == report.classes[likely]
                given = np.searchsorted(report.classes, y[i])
                assert scores[i] == pytest.approx(np.log(proba[likely] / proba[given]))
    # The photo the model knows: the copy filed as cardboard is the issue, not the original.
    copy, original = filed_twice["known"]
    assert issues.get(copy) == "paper" and original not in issues
    # Filed under two classes neither of which the evidence favours: both copies are label issues.
    assert [issues.get(i) for i in filed_twice["elsewhere"]] == ["paper", "paper"]
    # Certain label problems come first, then the others, most suspicious first.
    certain = {i for group in conflicting for i in group if i in issues}
    assert set(report.label_issues[:len(certain)].tolist()) == certain
    assert np.all(np.diff(report.label_scores[:len(certain)]) <= 0)
    assert np.all(np.diff(report.label_scores[len(certain):]) <= 0)
    # Their rows carry their duplicate group's number, which names them in the table.
    frame = report.to_frame()
    rows = frame[frame.finding == "label_issue"].set_index("path")
    duplicates = frame[frame.finding == "duplicate"].set_index("path")
    assert rows.loc[X[copy], "group"] == duplicates.loc[X[copy], "group"]
    assert rows["group"].notna().sum() == len(certain)


def test_cleaned_keeps_the_copy_with_the_groups_label(filed_twice):
    report, X, y = filed_twice["report"], filed_twice["X"], filed_twice["y"]
    copy, original = filed_twice["known"]
    # Whichever copy the evidence favours, the one kept carries the group's likely label.
    second = list(filed_twice["second"])
    likely = report.classes[report.label_proba[second].sum(axis=0).argmax()]
    for drop in (("duplicate",), ("label_issue",), FINDINGS):
        kept, labels = report.cleaned(drop=drop)
        assert X[original] in kept and X[copy] not in kept, drop
        assert [y[i] for i in second if X[i] in kept] == [likely] * (likely in y[second]), drop
        # No copy's label is the group's: which one is right cannot be told from them, so both go.
        assert not set(X[i] for i in filed_twice["elsewhere"]) & set(kept), drop
        assert labels.tolist() == [y[X.index(x)] for x in kept]


def test_label_conflicts_judge_each_group_as_a_whole():
    proba = np.array([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1],  # group 0-1: labelled 0 and 1, most probably 0
                      [0.2, 0.3, 0.5], [0.2, 0.3, 0.5],  # group 2-3: labelled 0 and 1, most probably 2
                      [0.1, 0.8, 0.1], [0.3, 0.4, 0.3],  # group 4-5: one label, left to the other suspects
                      [0.4, 0.4, 0.2], [0.4, 0.4, 0.2]])  # group 6-7: a tie between its labels
    y = np.array([0, 1, 0, 1, 0, 0, 1, 0])
    groups = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5]), np.array([6, 7])]
    indices, suggested, scores = label_conflicts(groups, y, proba)
    # Most suspicious first: log(sum p(suggested) / sum p(given)) over the group; a tie goes to the first class.
    assert indices.tolist() == [2, 1, 3, 6] and suggested.tolist() == [2, 0, 2, 0]
    np.testing.assert_allclose(scores, np.log([1.0 / 0.4, 1.2 / 0.6, 1.0 / 0.6, 1.0]))


def test_leakage_rows_tell_the_split(filed_twice, tmp_path):
    report = filed_twice["report"]
    # The test set holds the very file of X: only the split tells its two rows apart.
    frame = report.to_frame()
    leak = frame[frame.finding == "leakage"]
    assert leak["path"].tolist() == [filed_twice["X_test"][0]] * 2
    assert leak["split"].tolist() == ["train", "test"]
    assert set(frame.loc[frame.finding != "leakage", "split"]) == {"train"}
    report.to_csv(tmp_path / "findings.csv")
    with open(tmp_path / "findings.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    assert [r["split"] for r in rows if r["finding"] == "leakage"] == ["train", "test"]


def test_counts_say_what_they_count(faulty, tmp_path):
    report = faulty["report"]
    n_groups, n_images = len(report.duplicate_groups), sum(map(len, report.duplicate_groups))
    assert "1 leakage group," in repr(report) and f"{n_groups} duplicate groups," in repr(report)
    report.to_html(tmp_path / "index.html")
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert f"<h2>Duplicates ({n_images} images in {n_groups} groups)</h2>" in page
    assert "<h2>Leakage across the split (2 images in 1 group)</h2>" in page
    assert f"<h2>Suspected label errors ({len(report.label_issues)} images)</h2>" in page
    n_outliers = len(report.outliers)
    assert f"<h2>Outliers ({n_outliers} image{'' if n_outliers == 1 else 's'})</h2>" in page


def test_the_page_says_what_it_found_in_words_and_links_each_image(faulty, tmp_path):
    import urllib.parse

    report = faulty["report"]
    out = tmp_path / "report"
    report.to_html(out / "index.html")
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "AuditReport(" not in page  # a sentence, not Python's repr
    assert f"Out-of-fold accuracy of the head: {report.oof_accuracy:.3f}" in page
    for i in report.label_issues:  # each thumbnail opens its image, relative to the page
        href = urllib.parse.quote(os.path.relpath(os.path.abspath(report.items[i]), out))
        assert f'<a href="{href}">' in page
    # Many suspects for the folder: most are likely the head's own mistakes, and the page says so.
    note = "own mistakes (a small or hard folder), not label errors"
    many = len(report.label_issues) > MANY_SUSPECTS * len(report.items)
    assert (note in page) == (note in report.summary()) == many
    few = copy.copy(report)
    few.label_issues = report.label_issues[:int(MANY_SUSPECTS * len(report.items))]
    assert note not in few.summary() and f"{len(few.label_issues)} suspected label error" in few.summary()


def test_report_shows_how_often_the_cross_validated_model_is_right(faulty):
    # Suspects are only as good as the out-of-fold model: a user deciding whether to drop them
    # sees its accuracy beside their number.
    report, y = faulty["report"], faulty["y"]
    expected = np.mean(report.classes[report.oof_proba.argmax(axis=1)] == y)
    assert report.oof_accuracy == pytest.approx(expected)
    assert f"out-of-fold accuracy {expected:.2f}" in repr(report)


def test_confident_learning_thresholds():
    # Class 0's images have p0 = 0.9, 0.8, 0.1: its threshold is their mean, 0.6.
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.3, 0.7], [0.35, 0.65]])
    y = np.array([0, 0, 0, 1, 1])
    for flag in ("estimated_number", "prune_by_noise_rate", "confident_learning", "all"):
        indices, suggested, scores, thresholds = find_label_issues(y, proba, flag=flag)
        np.testing.assert_allclose(thresholds, [0.6, (0.7 + 0.65) / 2])
        assert indices.tolist() == [2] and suggested.tolist() == [1]
        np.testing.assert_allclose(scores, [np.log(0.9 / 0.1)])  # p(suggested) / p(given)


def soft_noise(weak_flip, doubtful=0):
    """300 images of 3 classes; 10 of the 100 labelled 0 are truly class 1.

    Class 0's correct images: 45 with p0 = 0.9, 45 with p0 = 0.5 (its
    threshold, their mean with the flipped ones, lands between: only the
    first 45 are counted on the diagonal). 5 flipped images are confidently
    class 1 (p1 = 0.9); 5 more have ``weak_flip`` as probabilities, under
    class 1's threshold of 0.8. Classes 1 and 2 are clean, every image at 0.8
    but ``doubtful`` images of class 2 the model finds slightly more like
    class 0 (p = 0.55, 0, 0.45), reaching no class's threshold.
    """
    proba = np.array([[0.9, 0.05, 0.05]] * 45 + [[0.5, 0.25, 0.25]] * 45 + [[0.05, 0.9, 0.05]] * 5
                     + [weak_flip] * 5 + [[0.1, 0.8, 0.1]] * 100 + [[0.1, 0.1, 0.8]] * (100 - doubtful)
                     + [[0.55, 0.0, 0.45]] * doubtful)
    y = np.repeat([0, 1, 2], 100)
    return y, proba, np.arange(90, 95), np.arange(95, 100)


def test_calibrated_confident_joint_counts_flips_under_the_threshold():
    y, proba, strong, weak = soft_noise([0.35, 0.6, 0.05])
    counts, thresholds, guess = confident_joint(y, proba)
    np.testing.assert_allclose(thresholds, [0.65, 0.8, 0.8])
    np.testing.assert_array_equal(counts, [[45, 5, 0], [0, 100, 0], [0, 0, 100]])
    np.testing.assert_array_equal(guess[strong], [1] * 5)
    np.testing.assert_array_equal(guess[weak], [-1] * 5)
    # Row 0 holds 50 counted images of 100: scaled to the label counts, 90 true 0 and 10 true 1.
    np.testing.assert_array_equal(calibrated_joint(counts, y), [[90, 10, 0], [0, 100, 0], [0, 0, 100]])


@pytest.mark.parametrize("flag", ["estimated_number", "prune_by_noise_rate"])
def test_flips_under_the_threshold_found(flag):
    """The calibrated joint says 10 images of class 0 are class 1: both rules find all 10 flips."""
    y, proba, strong, weak = soft_noise([0.35, 0.6, 0.05], doubtful=5)
    indices, suggested, scores, _ = find_label_issues(y, proba, flag=flag)
    assert indices.tolist() == strong.tolist() + weak.tolist()  # most confidently another class first
    assert suggested.tolist() == [1] * 10
    np.testing.assert_allclose(scores, [np.log(0.9 / 0.05)] * 5 + [np.log(0.6 / 0.35)] * 5)
    # The off-diagonal of the confident joint alone misses the flips under class 1's threshold;
    # every image classified as another class includes the 5 doubtful ones, ranked last.
    assert find_label_issues(y, proba, flag="confident_learning")[0].tolist() == strong.tolist()
    assert find_label_issues(y, proba, flag="all")[0].tolist() == indices.tolist() + list(range(295, 300))


@pytest.mark.parametrize("flag", ["estimated_number", "prune_by_noise_rate", "all"])
def test_images_the_model_agrees_with_spared(flag):
    # The estimate is again 10 images, but the 5 next-most suspicious still favour their given label.
    y, proba, strong, agreeing = soft_noise([0.5, 0.45, 0.05])
    np.testing.assert_array_equal(calibrated_joint(confident_joint(y, proba)[0], y)[0], [90, 10, 0])
    assert find_label_issues(y, proba, flag=flag)[0].tolist() == strong.tolist()


def test_calibrated_joint_keeps_label_counts():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(4), size=200)
    y = rng.integers(0, 4, size=200)
    joint = calibrated_joint(confident_joint(y, proba)[0], y)
    np.testing.assert_array_equal(joint.sum(axis=1), np.bincount(y))
    assert (joint >= 0).all()


def test_calibration_fills_only_rows_with_nothing_counted():
    # Class 0's images are all confidently class 1: its row keeps a 0 on the diagonal, and
    # scales to 4 of 4 images truly class 1. Class 2 has nothing counted: its 3 images stay.
    counts = np.array([[0, 2, 0], [1, 5, 0], [0, 0, 0]])
    y = np.repeat([0, 1, 2], [4, 6, 3])
    np.testing.assert_array_equal(calibrated_joint(counts, y), [[0, 4, 0], [1, 5, 0], [0, 0, 3]])


def test_classes_without_a_threshold_reach_no_image():
    # Class 2 was in no training fold of its images (a custom cv splitter): p2 = 0 for all of
    # them, so it has no threshold, and images reaching no other threshold are counted nowhere.
    proba = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1], [0.5, 0.5, 0.0]])
    y = np.array([0, 0, 1, 1, 2])
    counts, thresholds, guess = confident_joint(y, proba)
    np.testing.assert_allclose(thresholds, [0.65, 0.65, np.nan])
    assert guess.tolist() == [0, -1, 1, -1, -1]
    np.testing.assert_array_equal(counts, [[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    # A class no image is labelled with has no threshold either (and no warning of an empty mean).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        counts, thresholds, guess = confident_joint(y[:4], proba[:4])
    assert np.isnan(thresholds[2]) and guess.tolist() == [0, -1, 1, -1]


def test_log_ratio_treats_vanishing_probabilities_alike():
    # float32 softmax outputs: one given-label probability underflowed to 0, one did not.
    proba = np.array([[0.0, 1.0], [1e-20, 1.0], [1e-15, 1.0], [0.5, 0.5]], dtype=np.float32)
    scores = log_ratio(np.zeros(4, dtype=int), proba)
    np.testing.assert_allclose(scores, [np.log(1e12)] * 3 + [0.0], rtol=1e-6)


def test_rankings():
    proba = np.array([[0.5, 0.4, 0.1], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6], [0.25, 0.7, 0.05],
                      [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    y = np.array([0, 0, 0, 0, 1, 2])
    np.testing.assert_allclose(normalized_margin(y, proba), [0.1, -0.3, -0.4, -0.45, 0.7, 0.7])
    np.testing.assert_allclose(log_ratio(y, proba), np.log([0.8, 2, 3, 2.8, 0.125, 0.125]))
    # Images 1, 2 and 3 favour another class; each ranking orders them differently.
    for rank, order, scores in [("log_ratio", [2, 3, 1], np.log([3, 2.8, 2])),
                                ("self_confidence", [2, 3, 1], [0.8, 0.75, 0.7]),
                                ("normalized_margin", [3, 2, 1], [0.45, 0.4, 0.3])]:
        indices, suggested, found, _ = find_label_issues(y, proba, flag="all", rank=rank)
        assert indices.tolist() == order, rank
        np.testing.assert_allclose(found, scores)
        assert suggested.tolist() == [{1: 1, 2: 2, 3: 1}[i] for i in order]
    with pytest.raises(ValueError, match="flag="):
        find_label_issues(y, proba, flag="both")
    with pytest.raises(ValueError, match="rank="):
        find_label_issues(y, proba, rank="margin")


def test_log_ratio_ranking_does_not_depend_on_the_heads_temperature():
    """The same logits, softened or sharpened: the log-ratio keeps its order, self-confidence does not
    (as long as the probabilities stay above the 1e-12 floor: here at least 1.6e-10)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 4)) * rng.uniform(0.5, 3, size=(60, 1))
    y = rng.integers(0, 4, size=60)

    def order(temperature, rank):
        z = logits / temperature
        proba = np.exp(z - z.max(axis=1, keepdims=True))
        return find_label_issues(y, proba / proba.sum(axis=1, keepdims=True), flag="all", rank=rank)[0].tolist()

    assert order(0.5, "log_ratio") == order(1.0, "log_ratio") == order(4.0, "log_ratio")
    assert order(0.5, "self_confidence") != order(4.0, "self_confidence")


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
    assert list(rows[0]) == ["path", "finding", "given_label", "suggested_label", "score", "group", "split"]
    assert {r["finding"] for r in rows} <= {"label_issue", "duplicate", "leakage", "outlier"}
    leak = [r for r in rows if r["finding"] == "leakage"]
    assert {Path(r["path"]).name for r in leak} == {first.name, "<b>copy.jpg", "leak.jpg"}
    assert not any(r[k].startswith(("=", "+", "-", "@")) for r in rows for k in r)
    assert "'=HYPERLINK(1)" in {r["given_label"] for r in rows}
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "&lt;b&gt;copy.jpg" in page and "<b>copy.jpg" not in page
    assert page.count("data:image/jpeg;base64,") == len(rows)
    assert not list(out.glob(".*.tmp"))  # written through temporary files, none left behind


def test_cli_report_shows_names_that_are_not_utf8(sample, tmp_path):
    """File and class names whose bytes are not UTF-8 are shown as \\xNN on the page, as in the
    CSV: the page is written after all the audit's work, and must not fail on a name."""
    paths, labels = sample
    data = tmp_path / "photos"
    for c, folder in (("glass", "glass"), ("metal", os.fsdecode(b"m\xe9tal"))):
        (data / folder).mkdir(parents=True)
        for p in [p for p, lab in zip(paths, labels) if lab == c][:3]:
            shutil.copy(p, data / folder / Path(p).name)
    first = sorted((data / "glass").iterdir())[0]
    for name in (b"dup\xff1.jpg", b"dup\xff2.jpg"):
        shutil.copy(first, data / os.fsdecode(b"m\xe9tal") / os.fsdecode(name))
    out = tmp_path / "audit out"
    assert main(["audit", str(data), "-o", str(out), "--cv", "2"]) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "dup\\xff1.jpg" in page and "dup\\xff2.jpg" in page and "m\\xe9tal" in page
    findings = (out / "findings.csv").read_text(encoding="utf-8")
    assert "dup\\xff1.jpg" in findings and "m\\xe9tal" in findings


@pytest.mark.parametrize("kwargs, message", [
    (dict(y=["a"] * 5), "one label per image"),
    (dict(cv=20), "fewer than cv=20"),
    (dict(cv=1), "at least 2"),
    (dict(duplicate_threshold=1.5), "duplicate_threshold"),
    (dict(duplicate_threshold="high"), "duplicate_threshold"),
    (dict(n_neighbors=0), "n_neighbors"),
    (dict(X_test=["missing.jpg"], y_test=["a", "b"]), "y_test"),
    (dict(y_test=["a", "b", "a"]), "y_test was given without X_test"),
    (dict(X_test=["missing.jpg"]), r"1 input\(s\) of X_test cannot be used as images:\n  \[0\] 'missing.jpg'"),
    (dict(y=["a"] * 12), "y has a single class \\('a'\\)"),
])
def test_bad_input_errors_before_any_work(sample, kwargs, message):
    X, y = sample[0][:12], np.repeat(["a", "b"], 6)
    arguments = {"X": X, "y": y, **kwargs}
    with ForwardCounter(build_backbone("efficientnet_lite0").module) as counter:
        with pytest.raises(ValueError, match=message):
            audit(PretrainedImageClassifier(), **arguments)
        assert counter.images == 0


def test_settings_a_training_fold_cannot_take_are_refused_before_any_work(sample):
    # 24 photos of 3 classes: all of them leave 3 to hold out for the temperature, one per class,
    # but a training fold of cv=3 (16 photos) only 2.
    X, y = sample[0][:24], np.repeat(["a", "b", "c"], 8)
    with ForwardCounter(build_backbone("efficientnet_lite0").module) as counter:
        with pytest.raises(ValueError, match="2 images held out for 3 classes.*a training fold of cv=3"):
            audit(PretrainedImageClassifier(calibration="temperature"), X, y, cv=3)
        assert counter.images == 0


def test_estimator_must_be_an_image_classifier(sample):
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(TypeError, match="PretrainedImageClassifier"):
        audit(LogisticRegression(), sample[0][:12], np.repeat(["a", "b"], 6))


def test_cli_reports_a_missing_folder(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")]) == 1
    assert "nowhere" in capsys.readouterr().err


def test_outliers_of_a_small_class_holding_a_copy():
    # Three photos of a class, one of them twice: its copies leave two neighbours outside their
    # group, so at most two are asked for (asking for three gave infinite distances, a NaN fence
    # and numpy's RuntimeWarning).
    import warnings

    rng = np.random.default_rng(0)
    unit = rng.normal(size=(8, 16))
    unit[1] = unit[0]
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    y_enc = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    components = np.array([0, 0, 1, 2, 3, 4, 5, 6])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        indices, scores = class_outliers(unit, y_enc, 2, components, n_neighbors=5)
    assert np.isfinite(scores).all()

