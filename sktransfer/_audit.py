"""Audit a labelled photo set before trusting it: label errors, duplicates, leakage, outliers.

Everything comes from what sktransfer already has: the cached features of
every image (one backbone pass each) and the out-of-fold predicted
probabilities of one cross-validation of the head.

* Label issues follow confident learning (Northcutt, Jiang and Chuang, 2021)
  on the evidence of two classifiers: the head's out-of-fold probabilities,
  and the vote of each image's k nearest neighbours in feature space (cosine,
  leaving out the image and its duplicates; k = round(sqrt(n)); Laplace
  smoothed), a classifier with another bias than a linear head (deep k-NN,
  Bahri, Jiang and Gupta, ICML 2020). Their renormalised geometric mean (a
  product of experts: its log-ratios are the mean of the two classifiers')
  is the probability p below. The threshold of class j is the average p_j
  over the images labelled j (its average self-confidence); an image
  labelled i whose p of another class j reaches that class's threshold (the
  most probable such j) is counted in the cell (i, j) of the confident joint.
  Each row of the joint, rescaled to the number of images labelled i (the
  calibration of the paper), estimates how many of them are truly each class:
  its off-diagonal cells add up to the estimated number of label errors, N.
  The suspects are the N images that p most confidently puts in another
  class than their label, ranked by the log-ratio
  log(p(suggested) / p(given label)), where the suggested label is the most
  probable other class; only images whose most probable class is not their
  label can be suspects. The head's half of the log-ratio is its logit
  difference divided by its softmax temperature, so a sharper head weighs
  more against the neighbours' vote; per-class thresholds set how many are
  flagged, not which. docs/audit.md compares this with the head alone, with
  noise-rate pruning and with rankings by self-confidence and by normalized
  margin. A duplicate group whose images carry different labels is one
  photo filed under two classes, a label error for certain: the images
  labelled otherwise than the group's most probable class (p summed over
  the group) are label issues, listed before the others.
* Duplicates are images whose L2-normalised features have a cosine
  similarity of at least ``duplicate_threshold`` (found with scikit-learn's
  ``NearestNeighbors`` radius search), or whose perceptual hashes (255 bits
  of the low DCT frequencies of a 32-pixel grayscale thumbnail) differ in
  at most ``HASH_DISTANCE`` bits, joined into groups; byte-identical files
  are duplicates whatever the thresholds. The hash catches copies that
  re-encoding or resizing moved in feature space (on small photos, further
  than two distinct photos of a class). The default threshold ("auto") adapts
  to the folder: a pair is joined when its cosine distance is at most
  ``AUTO_DISTANCE_RATIO`` times the median distance of an image to its third
  nearest neighbour (the third, so that groups of up to three copies do not
  shrink the yardstick), since how alike distinct photos look to the backbone
  varies from folder to folder (hands on one white wall vs. household waste). A group with members in both
  ``X`` and ``X_test`` is leakage.
* Outliers are far from every class: for each class, the mean cosine distance
  of an image to its ``n_neighbors`` nearest images of that class, divided by
  the class's own fence (upper quartile + 1.5 x inter-quartile range of the
  same distance among its members, each leaving itself out). An image whose
  smallest ratio over the classes exceeds 1 is an outlier.
"""

from __future__ import annotations

import base64
import html
import io
import numbers
import os
import sys

import numpy as np

from ._inputs import ImageInputError, _count, as_image_list, error_reason, read_item
from ._outputs import csv_text, relative_href, safe_text, write_atomic

__all__ = ["audit", "AuditReport"]

#: The kinds of finding, in the order a report lists them.
FINDINGS = ("label_issue", "duplicate", "leakage", "outlier")
#: Outliers lie beyond this many inter-quartile ranges above each class's upper quartile.
OUTLIER_IQR = 1.5
#: duplicate_threshold="auto": duplicates are this much closer than the median third-nearest neighbour.
AUTO_DISTANCE_RATIO = 0.35
#: Perceptual hash: the sign of the HASH_SIZE x HASH_SIZE lowest DCT frequencies (less the constant one)
#: of a HASH_THUMBNAIL-pixel square grayscale thumbnail, against their median: 255 bits.
HASH_SIZE = 16
HASH_THUMBNAIL = 32
#: Images whose perceptual hashes differ in at most this many of the 255 bits are duplicates
#: (re-encoded and resized copies: <= 12; distinct photos: >= 42 on sign_digits; docs/audit.md).
HASH_DISTANCE = 24
#: log_ratio clamps probabilities here: float32 softmax outputs below it have underflowed or are noise.
PROBA_FLOOR = 1e-12
#: The columns of the table; ``split`` last, so that the older columns keep their places.
COLUMNS = ["path", "finding", "given_label", "suggested_label", "score", "group", "split"]
#: A share of the images beyond which the suspected label errors are said to be mostly the
#: head's own mistakes: real folders seldom have more than a few percent of their labels wrong.
MANY_SUSPECTS = 0.1
#: ``split`` of an image of ``X`` and of ``X_test``.
SPLITS = {"X": "train", "X_test": "test"}


class AuditReport:
    """What :func:`audit` found in a labelled image set.

    Indices refer to positions in ``X`` (``test_*`` ones to positions in
    ``X_test``).

    Attributes
    ----------
    classes : ndarray
        The class labels, in the column order of ``oof_proba``.
    oof_proba : ndarray of shape (n_images, n_classes)
        Out-of-fold predicted probabilities of the cross-validated estimator.
    neighbour_proba : ndarray of shape (n_images, n_classes)
        Class probabilities from the given labels of each image's
        ``round(sqrt(n_images))`` nearest neighbours in feature space (at
        most the images outside the largest duplicate group; leaving out the
        image and its duplicates; Laplace-smoothed).
    label_proba : ndarray of shape (n_images, n_classes)
        The evidence label issues are found on: the renormalised geometric
        mean of ``oof_proba`` and ``neighbour_proba``.
    thresholds : ndarray of shape (n_classes,)
        Per-class confident-learning thresholds (average self-confidence in ``label_proba``),
        from which the number of label issues is estimated; nan for a class
        its own images get no probability of (left out of their training
        folds by a custom ``cv``), which then counts no image.
    duplicate_threshold : float
        The cosine similarity from which images were joined as duplicates.
    oof_accuracy : float
        The share of images whose most probable class in ``oof_proba`` is
        their given label.
    label_issues : ndarray of int
        Suspected label errors: first the copies filed under another class
        than their duplicate group's most probable one (a certain label
        problem, see :func:`label_conflicts`), then the others; each part
        most suspicious first.
    suggested_labels : ndarray
        The most probable class per label issue (never the given label): of
        the image, or of its duplicate group for a copy filed under another
        class than the group's.
    label_scores : ndarray of float
        ``log(p(suggested) / p(given label))`` in ``label_proba`` (summed
        over the duplicate group for a copy filed under another class than
        the group's) per label issue (higher: more suspicious; positive, as
        the suggested class is the more probable; 0 for a tie).
    duplicate_groups : list of ndarray of int
        Groups of two or more images of ``X`` that are (near-)duplicates of
        each other and of nothing in ``X_test``.
    duplicate_scores : ndarray of float
        Per image of ``X`` (and ``X_test`` after them): its highest cosine
        similarity to another member of its group (1.0 for identical files).
    leakage_groups : list of (ndarray of int, ndarray of int)
        Duplicate groups across the split: (indices in ``X``, indices in ``X_test``).
    outliers : ndarray of int
        Images far from every class, most isolated first.
    outlier_scores : ndarray of float
        Per outlier: its distance to the nearest class relative to that class's fence (> 1).
    """

    def __init__(self, items, y, test_items, y_test, *, classes, oof_proba, neighbour_proba, label_proba,
                 thresholds, duplicate_threshold, label_issues,
                 suggested_labels, label_scores, duplicate_groups, duplicate_scores, leakage_groups,
                 outliers, outlier_scores):
        self.items, self.y = items, y
        self.test_items, self.y_test = test_items, y_test
        self.classes = classes
        self.oof_proba = oof_proba
        self.neighbour_proba = neighbour_proba
        self.label_proba = label_proba
        self.thresholds = thresholds
        self.duplicate_threshold = duplicate_threshold
        self.label_issues = label_issues
        self.suggested_labels = suggested_labels
        self.label_scores = label_scores
        self.duplicate_groups = duplicate_groups
        self.duplicate_scores = duplicate_scores
        self.leakage_groups = leakage_groups
        self.outliers = outliers
        self.outlier_scores = outlier_scores

    @property
    def oof_accuracy(self):
        """The share of images whose most probable class out of fold is their given label.

        The label issues are only as good as this model: where it is often
        wrong (a small or hard folder), many suspects are labelled right.
        """
        return float(np.mean(self.classes[self.oof_proba.argmax(axis=1)] == self.y))

    def summary(self):
        """What the audit found, in sentences (as the command line prints it and the page shows it)."""
        text = (f"{_count(self.items, 'image')} audited: {_count(self.label_issues, 'suspected label error')}, "
                f"{_count(self.duplicate_groups, 'duplicate group')}, "
                f"{_count(self.leakage_groups, 'leakage group')}, {_count(self.outliers, 'outlier')}. "
                f"Out-of-fold accuracy of the head: {self.oof_accuracy:.3f} (how far to trust its label "
                "suggestions).")
        if len(self.label_issues) > MANY_SUSPECTS * len(self.items):
            text += (f" The suspects are {len(self.label_issues) / len(self.items):.0%} of the images: most are "
                     "likely the head's own mistakes (a small or hard folder), not label errors. Look at the "
                     "highest scores first, and drop none unseen.")
        return text

    def __repr__(self):
        return (f"AuditReport({_count(self.items, 'image')}: {_count(self.label_issues, 'label issue')}, "
                f"{_count(self.duplicate_groups, 'duplicate group')}, {_count(self.leakage_groups, 'leakage group')}, "
                f"{_count(self.outliers, 'outlier')}; out-of-fold accuracy {self.oof_accuracy:.2f})")

    def _name(self, index, test=False):
        item = (self.test_items if test else self.items)[index]
        if isinstance(item, (str, os.PathLike, np.str_)):
            return os.fspath(item)
        return f"{'X_test' if test else 'X'}[{index}]"

    def _y_encoded(self):
        """``y`` as indices into ``classes``."""
        return np.searchsorted(self.classes, self.y)

    def _rows(self):
        """(finding, side, index, given, suggested, score, group) for every finding.

        A label issue of a copy filed under another class than its group's
        carries the group's number.
        """
        n = len(self.items)
        y_enc = self._y_encoded()
        in_x = groups_in_x(self.duplicate_groups, self.leakage_groups)  # numbered as below
        conflicting = {int(i): group for group, members in enumerate(in_x, 1)
                       if mixed_labels(members, y_enc) for i in members}
        for i, label, score in zip(self.label_issues, self.suggested_labels, self.label_scores):
            yield "label_issue", "X", int(i), self.y[i], label, float(score), conflicting.get(int(i))
        group = 0
        for members in self.duplicate_groups:
            group += 1
            for i in members:
                yield "duplicate", "X", int(i), self.y[i], None, float(self.duplicate_scores[i]), group
        for train, test in self.leakage_groups:
            group += 1
            for i in train:
                yield "leakage", "X", int(i), self.y[i], None, float(self.duplicate_scores[i]), group
            for j in test:
                given = None if self.y_test is None else self.y_test[j]
                yield "leakage", "X_test", int(j), given, None, float(self.duplicate_scores[n + j]), group
        for i, score in zip(self.outliers, self.outlier_scores):
            yield "outlier", "X", int(i), self.y[i], None, float(score), None

    def to_frame(self):
        """One row per finding: ``path, finding, given_label, suggested_label, score, group, split``.

        ``path`` is the image's path (``X[i]`` or ``X_test[j]`` for images
        given as bytes or arrays); members of a duplicate or leakage group
        share ``group``, which a label issue of a copy filed under another
        class than its group's also carries (it is missing, ``<NA>``, for
        the other findings). ``split`` is ``"train"`` for an image of ``X``
        and ``"test"`` for one of ``X_test``: it tells apart the two leakage
        rows of a file that is in both.

        Returns
        -------
        frame : pandas.DataFrame
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("AuditReport.to_frame needs pandas: pip install pandas "
                              "(to_csv and to_html do not).") from None
        frame = pd.DataFrame(self._records(), columns=COLUMNS)
        frame["group"] = frame["group"].astype("Int64")
        return frame

    def _records(self):
        """The rows of :meth:`to_frame` as tuples, with plain Python values."""
        return [(self._name(i, side == "X_test"), finding, _plain(given), _plain(suggested), score, group,
                 SPLITS[side])
                for finding, side, i, given, suggested, score, group in self._rows()]

    def cleaned(self, drop=FINDINGS):
        """``X`` and ``y`` without the images of the findings named in ``drop``.

        Label issues are suspects, not verdicts: look at them first
        (:meth:`to_html`). Where the out-of-fold model is often wrong
        (:attr:`oof_accuracy`), many are labelled right; keep them with
        ``drop=("duplicate", "leakage", "outlier")``.

        Of each duplicate group the first image stays, unless the group's
        images carry different labels: then the first one labelled with the
        group's most probable class (:func:`label_conflicts`) stays, and none
        where no image is (the right label is none of theirs). A copy labelled
        otherwise is a label issue, so ``drop="label_issue"`` removes it too.
        Of each leakage group the images in ``X`` go (the test images are
        what they leaked into).

        Parameters
        ----------
        drop : iterable of {"label_issue", "duplicate", "leakage", "outlier"}, default=all

        Returns
        -------
        X : list
            The kept images, in their original order.
        y : ndarray
            Their labels.
        """
        drop = [drop] if isinstance(drop, str) else list(drop)
        unknown = [d for d in drop if d not in FINDINGS]
        if unknown:
            raise ValueError(f"drop={unknown!r} names no kind of finding; use any of {list(FINDINGS)}.")
        remove = set()
        if "label_issue" in drop:
            remove.update(self.label_issues.tolist())
        if "duplicate" in drop:
            y_enc = self._y_encoded()
            for members in self.duplicate_groups:
                likely = members[y_enc[members] == group_class(members, self.label_proba)]
                kept = likely[:1] if mixed_labels(members, y_enc) else members[:1]
                remove.update(set(members.tolist()) - set(kept.tolist()))
        if "leakage" in drop:
            for train, _ in self.leakage_groups:
                remove.update(train.tolist())
        if "outlier" in drop:
            remove.update(self.outliers.tolist())
        keep = [i for i in range(len(self.items)) if i not in remove]
        return [self.items[i] for i in keep], self.y[keep]

    def to_html(self, path, thumbnail_size=128):
        """Write a self-contained HTML page of the findings, each with a thumbnail.

        Thumbnails are embedded in the page, so it reads offline and can be
        moved or mailed alone. The file is written atomically; missing folders
        of ``path`` are made.

        Parameters
        ----------
        path : str or path-like
        thumbnail_size : int, default=128
            Longest side of the thumbnails, in pixels.
        """
        files = [os.path.abspath(os.fspath(item)) for item in self.items + self.test_items
                 if isinstance(item, (str, os.PathLike, np.str_))]
        # Paths are shown relative to the folder all the images are in, to keep captions short.
        try:
            root = os.path.commonpath([os.path.dirname(f) for f in files]) if files else None
        except ValueError:  # on different drives
            root = None
        page_folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        sections = []
        for finding, title, explanation in (
            ("label_issue", "Suspected label errors",
             "The out-of-fold model and the image's nearest neighbours put it in another class. "
             "Score: log(p(suggested) / p(given)), higher is more confident. Those with a group come "
             "first: copies filed under another class than the group's most probable one (summed over "
             "the group), certainly a label problem; the group is in the duplicates or the leakage below."),
            ("duplicate", "Duplicates", "Images with nearly the same features or pixels (one group per row). "
             "Score: cosine similarity to the closest other member (1 for identical files)."),
            ("leakage", "Leakage across the split", "Images in both the data and the test set."),
            ("outlier", "Outliers", "Far from every class. Score: distance to the nearest class "
             "relative to that class's own spread (above 1 is beyond the class's fence)."),
        ):
            rows = [r for r in self._rows() if r[0] == finding]
            cells = []
            for _, side, i, given, suggested, score, group in rows:
                item = (self.test_items if side == "X_test" else self.items)[i]
                name = self._name(i, side == "X_test")
                if root is not None and isinstance(item, (str, os.PathLike, np.str_)):
                    name = os.path.relpath(os.path.abspath(name), root)
                caption = [_html(name)]
                if side == "X_test":
                    caption.append("<b>test set</b>")
                if given is not None:
                    caption.append(f"given: <b>{_html(given)}</b>")
                if suggested is not None:
                    caption.append(f"suggested: <b>{_html(suggested)}</b>")
                caption.append(f"score {score:.3f}" + ("" if group is None else f", group {group}"))
                picture = _thumbnail(item, thumbnail_size)
                if isinstance(item, (str, os.PathLike, np.str_)):  # opens the image, relative to the page
                    picture = f'<a href="{relative_href(item, page_folder)}">{picture}</a>'
                cells.append((group, f'<figure>{picture}'
                                     f'<figcaption>{"<br>".join(caption)}</figcaption></figure>'))
            if finding in ("duplicate", "leakage"):
                groups = {}
                for group, cell in cells:
                    groups.setdefault(group, []).append(cell)
                body = "\n".join(f'<div class="group">{"".join(g)}</div>' for g in groups.values())
            else:
                body = f'<div class="group">{"".join(cell for _, cell in cells)}</div>'
            count = _count(rows, "image")
            if finding in ("duplicate", "leakage"):
                count += f" in {_count({r[6] for r in rows}, 'group')}"
            sections.append(f"<h2>{title} ({count})</h2>\n<p>{explanation}</p>\n"
                            + (body if rows else "<p>None found.</p>"))
        page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>sktransfer audit</title>
<style>body{{font-family:sans-serif;margin:1em 2em}}
.group{{display:flex;flex-wrap:wrap;gap:.5em;border-bottom:1px solid #ccc;padding:.5em 0}}
figure{{margin:0;width:{thumbnail_size + 32}px;font-size:small;overflow-wrap:anywhere}}
img{{max-width:{thumbnail_size}px;max-height:{thumbnail_size}px;display:block}}</style>
</head><body>
<h1>Audit of {len(self.items)} images</h1>
<p>{_html(self.summary())}{"" if root is None else f" Paths are relative to {_html(root)}."}
Each thumbnail opens its image.</p>
{chr(10).join(sections)}
</body></html>
"""
        write_atomic(path, page.encode("utf-8"), makedirs=True)

    def to_csv(self, path):
        """Write the rows of :meth:`to_frame` as CSV, atomically, with spreadsheet formulas neutralised
        (missing folders of ``path`` are made)."""
        write_atomic(path, csv_text([COLUMNS, *self._records()], lineterminator="\n").encode("utf-8"), makedirs=True)


def _plain(value):
    """numpy scalars as Python values, for a tidy frame."""
    return value.item() if isinstance(value, np.generic) else value


def _html(value):
    """``value`` as text for the page: markup escaped, a name's bytes that are not UTF-8 as ``\\xNN``."""
    return html.escape(safe_text(value))


def _thumbnail(item, size):
    """An <img> tag with a small JPEG of ``item`` embedded, or a note when it cannot be read."""
    from ._images import open_image

    try:
        image = open_image(read_item(item)[1]).convert("RGB")
    except (OSError, ValueError, TypeError) as e:
        return f"<p>(cannot show: {_html(e)})</p>"
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{data}" alt="">'


# --------------------------------------------------------------------------
# The three analyses, on arrays

def self_confidence(y_enc, proba):
    """The out-of-fold probability of each image's given label."""
    return proba[np.arange(len(y_enc)), y_enc]


def _others(y_enc, values):
    """A copy of ``values`` (one row per image) with each image's given-label column at -inf."""
    others = np.array(values, dtype=np.float64)
    others[np.arange(len(y_enc)), y_enc] = -np.inf
    return others


def normalized_margin(y_enc, proba):
    """p(given label) minus the largest probability of another class (negative: another class leads)."""
    return self_confidence(y_enc, proba) - _others(y_enc, proba).max(axis=1)


def log_ratio(y_enc, proba):
    """log(largest probability of another class / p(given label)): positive when another class leads.

    A softmax head's probabilities are ``softmax(z / T)``; this is
    ``(z_other - z_given) / T``, so the order it puts images in does not
    change when the head is sharper or softer (its temperature ``T``), as
    the order of ``1 - p(given)`` or of the normalized margin does.

    Probabilities are clamped at :data:`PROBA_FLOOR` (1e-12) first: below
    it a float32 softmax has underflowed or holds rounding noise, so such
    images tie (their order is their index order) rather than score up to
    708 from whichever underflowed to exactly 0.
    """
    logs = np.log(np.maximum(proba, PROBA_FLOOR))
    return _others(y_enc, logs).max(axis=1) - self_confidence(y_enc, logs)


def confident_joint(y_enc, proba):
    """The confident joint: ``(counts, thresholds, guess)``.

    ``thresholds[j]`` is the average probability of class j over the images
    labelled j; ``guess[n]`` is image n's most probable class among those
    whose threshold it reaches (-1 when it reaches none); ``counts[i, j]``
    is the number of images labelled i with guess j.

    A class that no image is labelled with, or whose images all have
    probability 0 of it (it was missing from the training folds of their
    predictions, possible with a custom cv splitter), has no threshold
    (nan): no image reaches it, where a threshold of 0 would let every image
    reach it.
    """
    n_classes = proba.shape[1]
    labelled = np.bincount(y_enc, minlength=n_classes)
    totals = np.bincount(y_enc, weights=proba[np.arange(len(y_enc)), y_enc], minlength=n_classes)
    thresholds = np.full(n_classes, np.nan)
    np.divide(totals, labelled, out=thresholds, where=totals > 0)
    confident = (proba >= thresholds) & (totals > 0)
    guess = np.where(confident.any(axis=1), np.where(confident, proba, -1.0).argmax(axis=1), -1)
    counted = guess >= 0
    counts = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(counts, (y_enc[counted], guess[counted]), 1)
    return counts, thresholds, guess


def calibrated_joint(counts, y_enc):
    """The confident joint with each row rescaled to its label's count: how many images labelled i are truly j.

    Rows are rounded to whole images keeping their totals (largest
    remainders first); a row with nothing counted in it gets one image on
    its diagonal, so every row has something to scale (a row with counts
    keeps its 0 diagonal: all its counted images are another class).
    """
    n_classes = len(counts)
    counts = counts.astype(float)
    empty = np.flatnonzero(counts.sum(axis=1) == 0)
    counts[empty, empty] = 1.0
    label_counts = np.bincount(y_enc, minlength=n_classes)
    scaled = counts / counts.sum(axis=1, keepdims=True) * label_counts[:, None]
    whole = np.floor(scaled).astype(int)
    for i in range(n_classes):
        short = label_counts[i] - whole[i].sum()
        whole[i, np.argsort(whole[i] - scaled[i], kind="stable")[:short]] += 1
    return whole


def prune_by_noise_rate(y_enc, proba, counts):
    """Boolean mask of the images confident learning's noise-rate pruning flags.

    For every pair of classes i != j, of the images labelled i the
    ``calibrated_joint(counts)[i, j]`` ones with the largest margin
    ``p_j - p_i`` are flagged; an image whose most probable class is its
    given label is then let go (the model agrees with the label).
    """
    estimated = calibrated_joint(counts, y_enc)
    flagged = np.zeros(len(y_enc), dtype=bool)
    for i in range(len(estimated)):
        members = np.flatnonzero(y_enc == i)
        # Leave at least one image in the class, as the paper's pruning does.
        budget = max(len(members) - 1, 0)
        for j in np.argsort(-estimated[i], kind="stable"):
            take = min(int(estimated[i, j]), budget) if j != i else 0
            budget -= take
            if take:
                margin = proba[members, j] - proba[members, i]
                flagged[members[np.argsort(-margin, kind="stable")[:take]]] = True
    return flagged & (proba.argmax(axis=1) != y_enc)


def nearest_outside_group(index, data_components, query, query_components, k):
    """Each query row's ``k`` nearest rows of ``index`` (a fitted ``NearestNeighbors``)
    outside the query's own duplicate group: ``(distances, indices)`` of shape ``(n_query, k)``,
    nearest first; where fewer than ``k`` rows are left, the rest is ``inf`` and -1.

    A query whose group has ``s`` members among the data asks for ``k + s``
    neighbours, so a large duplicate group costs its own queries only, not
    every image's.
    """
    n_query = len(query)
    distances, indices = np.full((n_query, k), np.inf), np.full((n_query, k), -1, dtype=np.intp)
    members = dict(zip(*np.unique(data_components, return_counts=True)))
    own = np.array([members.get(c, 0) for c in query_components.tolist()], dtype=np.intp)
    n_data = len(data_components)
    for size in np.unique(own):
        rows = np.flatnonzero(own == size)
        distance, neighbour = index.kneighbors(query[rows], n_neighbors=min(k + int(size), n_data))
        keep = data_components[neighbour] != query_components[rows, None]
        keep &= np.cumsum(keep, axis=1) <= k
        # The kept neighbours of each row first, in their order, then the rest.
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        kept = np.take_along_axis(keep, order, axis=1)
        width = order.shape[1]
        distances[rows, :width] = np.where(kept, np.take_along_axis(distance, order, axis=1), np.inf)
        indices[rows, :width] = np.where(kept, np.take_along_axis(neighbour, order, axis=1), -1)
    return distances, indices


def neighbour_proba(unit, y_enc, n_classes, components, k=None):
    """Class probabilities from the given labels of each image's ``k`` nearest neighbours.

    The neighbours are the ``k`` most cosine-similar images of ``unit``
    (unit feature vectors), leaving out the image itself and the other
    members of its duplicate group (same ``components`` id), so that a
    copy cannot vote for its twin's label. The votes are Laplace-smoothed,
    ``(votes_j + 1) / (k + n_classes)``, so no class gets probability 0.
    ``k`` defaults to ``round(sqrt(n))``, the classical rule that lets the
    vote sharpen as the folder grows (k and n / k both grow with n); it is
    capped at the images left to vote.
    """
    from sklearn.neighbors import NearestNeighbors

    n = len(unit)
    k = min(int(round(np.sqrt(n))) if k is None else k, n - int(np.bincount(components).max()))
    if k < 1:  # every image is a duplicate of every other: no neighbour to ask
        return np.full((n, n_classes), 1.0 / n_classes)
    _, neighbour = nearest_outside_group(NearestNeighbors().fit(unit), components, unit, components, k)
    votes = np.zeros((n, n_classes))
    rows, cols = np.nonzero(neighbour >= 0)
    np.add.at(votes, (rows, y_enc[neighbour[rows, cols]]), 1.0)
    return (votes + 1.0) / (k + n_classes)


def combine_evidence(proba, other):
    """The renormalised geometric mean of two classifiers' probabilities (a product of experts).

    Its log-ratio between two classes is the mean of the two classifiers'
    log-ratios, so each contributes evidence on the same (logit) scale.
    """
    mean = np.sqrt(np.asarray(proba, dtype=np.float64) * other)
    return mean / mean.sum(axis=1, keepdims=True)


#: How suspects are chosen and how they are ranked (see find_label_issues); audit uses the first of each.
FLAG_RULES = ("estimated_number", "prune_by_noise_rate", "confident_learning", "all")
RANK_RULES = ("log_ratio", "self_confidence", "normalized_margin")


def find_label_issues(y_enc, proba, flag="estimated_number", rank="log_ratio"):
    """Suspected label errors: ``(indices ranked, suggested class indices, scores, thresholds)``.

    Parameters
    ----------
    y_enc : ndarray of int
        Given labels, as column indices of ``proba``.
    proba : ndarray of shape (n_images, n_classes)
        Out-of-fold predicted probabilities.
    flag : {"estimated_number", "prune_by_noise_rate", "confident_learning", "all"}
        Which images are suspects. "all": every image whose most probable
        class is not its label. "estimated_number": the most suspicious of
        those (by ``rank``), as many as the calibrated confident joint
        estimates are mislabelled (the sum of its off-diagonal cells).
        "prune_by_noise_rate": those :func:`prune_by_noise_rate` flags.
        "confident_learning": the off-diagonal cells of the confident joint
        (:func:`confident_joint`).
    rank : {"log_ratio", "self_confidence", "normalized_margin"}
        Most suspicious first: highest :func:`log_ratio`, lowest
        probability of the given label, or lowest :func:`normalized_margin`.

    Returns
    -------
    indices : ndarray of int
    suggested : ndarray of int
        Per suspect, the most probable class other than the given label.
    scores : ndarray of float
        Higher is more suspicious: the log-ratio, ``1 - p(given)`` or ``-margin``.
    thresholds : ndarray of float
        The per-class thresholds of the confident joint.
    """
    counts, thresholds, guess = confident_joint(y_enc, proba)
    if flag in ("estimated_number", "all"):
        suspect = proba.argmax(axis=1) != y_enc
    elif flag == "prune_by_noise_rate":
        suspect = prune_by_noise_rate(y_enc, proba, counts)
    elif flag == "confident_learning":
        suspect = (guess >= 0) & (guess != y_enc)
    else:
        raise ValueError(f"flag={flag!r} must be one of {list(FLAG_RULES)}.")
    if rank == "log_ratio":
        scores = log_ratio(y_enc, proba)
    elif rank == "self_confidence":
        scores = 1.0 - self_confidence(y_enc, proba)
    elif rank == "normalized_margin":
        scores = -normalized_margin(y_enc, proba)
    else:
        raise ValueError(f"rank={rank!r} must be one of {list(RANK_RULES)}.")
    indices = np.flatnonzero(suspect)
    indices = indices[np.argsort(-scores[indices], kind="stable")]
    if flag == "estimated_number":
        estimated = calibrated_joint(counts, y_enc)
        indices = indices[:estimated.sum() - np.trace(estimated)]
    return indices, _others(y_enc, proba).argmax(axis=1)[indices], scores[indices], thresholds


def groups_in_x(duplicate_groups, leakage_groups):
    """The groups of copies among the images of ``X``: each duplicate group, then the ``X``
    side of each leakage group, in the order (and so with the numbers) of the findings."""
    return duplicate_groups + [train for train, _ in leakage_groups]


def mixed_labels(members, y_enc):
    """Whether the images of a duplicate group carry different labels (``y_enc`` of all images)."""
    return len(np.unique(y_enc[members])) > 1


def group_class(members, proba):
    """The most probable class of a duplicate group: the largest of ``proba`` summed over its ``members``."""
    return int(proba[members].sum(axis=0).argmax())


def label_conflicts(groups, y_enc, proba):
    """Copies filed under another class than their group's: ``(indices ranked, suggested, scores)``.

    A group of duplicates whose members carry different labels holds a
    label error for certain. Its most probable class (:func:`group_class`)
    is the suggested label of each member labelled otherwise, scored by the
    log-ratio of the group's summed probabilities,
    ``log(sum p(suggested) / sum p(given label))`` (0 for a tie), most
    suspicious first. The copies of a group are held out of each other's
    training folds and left out of each other's neighbours' vote, so their
    given labels do not weigh in their evidence.
    """
    indices, suggested, scores = [], [], []
    for members in (m for m in groups if mixed_labels(m, y_enc)):
        likely = group_class(members, proba)
        summed = np.maximum(proba[members].sum(axis=0), PROBA_FLOOR)
        for i in members[y_enc[members] != likely]:
            indices.append(int(i))
            suggested.append(likely)
            scores.append(float(np.log(summed[likely] / summed[y_enc[i]])))
    order = np.argsort(-np.array(scores), kind="stable")
    return (np.array(indices, dtype=np.intp)[order], np.array(suggested, dtype=np.intp)[order],
            np.array(scores, dtype=np.float64)[order])


def auto_threshold(unit):
    """The cosine similarity of ``duplicate_threshold="auto"`` for these unit feature vectors."""
    from sklearn.neighbors import NearestNeighbors

    k = min(4, len(unit))  # the image itself and its three nearest neighbours
    distance, _ = NearestNeighbors(n_neighbors=k).fit(unit).kneighbors(unit)
    third = distance[:, k - 1] ** 2 / 2.0  # cosine distance on unit vectors
    return float(1.0 - AUTO_DISTANCE_RATIO * np.median(third))


def perceptual_hash(image):
    """The 255-bit DCT hash (bool array) of a PIL image; see ``HASH_SIZE``.

    Low spatial frequencies of a small antialiased thumbnail survive JPEG
    re-encoding and resizing, which change the backbone's features of small
    photos more than the difference between two distinct photos of a class.
    """
    from PIL import Image

    size = HASH_THUMBNAIL
    gray = np.asarray(image.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)
    k = np.arange(size)
    dct = np.cos(np.pi * (2 * k[None, :] + 1) * k[:HASH_SIZE, None] / (2 * size))  # DCT-II rows
    low = (dct @ gray @ dct.T).ravel()[1:]
    return low > np.median(low)


def _pairs_within(hashes, distance):
    """Index pairs ``(rows, cols)``, both ways, of hashes at most ``distance`` bits apart."""
    from sklearn.neighbors import NearestNeighbors

    bits = hashes.shape[1]
    # The Hamming metric is the fraction of differing bits; half a bit of slack against rounding.
    search = NearestNeighbors(radius=(distance + 0.5) / bits, metric="hamming").fit(hashes)
    graph = search.radius_neighbors_graph(hashes, mode="connectivity").tocoo()
    off = graph.row != graph.col
    return graph.row[off], graph.col[off]


def duplicate_components(unit, digests, hashes, threshold):
    """Group ids and each image's best in-group feature similarity.

    Two images are joined when their features have a cosine similarity of
    at least ``threshold``, their perceptual ``hashes`` differ in at most
    ``HASH_DISTANCE`` bits, or their files are identical (``digests``);
    groups are the connected components.
    """
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components
    from sklearn.neighbors import NearestNeighbors

    n = len(unit)
    # On unit vectors |a - b|^2 = 2 - 2 cos(a, b): a radius search in Euclidean distance.
    radius = float(np.sqrt(max(2.0 - 2.0 * threshold, 0.0)))
    graph = NearestNeighbors(radius=radius).fit(unit).radius_neighbors_graph(unit, mode="distance")
    graph = graph.tocoo()
    off = graph.row != graph.col
    rows, cols = graph.row[off], graph.col[off]
    similarity = 1.0 - graph.data[off] ** 2 / 2.0
    # Pixel-level copies (re-encoded, resized), scored by their features' similarity.
    a, b = _pairs_within(hashes, HASH_DISTANCE)
    rows, cols = np.concatenate([rows, a]), np.concatenate([cols, b])
    similarity = np.concatenate([similarity, np.einsum("ij,ij->i", unit[a], unit[b])])
    # Identical files are duplicates whatever the threshold (and score exactly 1).
    first, same = {}, []
    for i, digest in enumerate(digests):
        j = first.setdefault(digest, i)
        if j != i:
            same.append((j, i))
    if same:
        a, b = np.array(same).T
        rows, cols = np.concatenate([rows, a, b]), np.concatenate([cols, b, a])
        similarity = np.concatenate([similarity, np.ones(2 * len(a))])
    adjacency = sparse.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, labels = connected_components(adjacency, directed=False)
    best = np.zeros(n)
    np.maximum.at(best, rows, np.minimum(similarity, 1.0))
    return labels, best


def class_outliers(unit, y_enc, n_classes, components, n_neighbors):
    """Outliers far from every class: ``(indices ranked, scores)``; see the module docstring."""
    from sklearn.neighbors import NearestNeighbors

    n = len(unit)
    ratio = np.full(n, np.inf)
    for c in range(n_classes):
        members = np.flatnonzero(y_enc == c)
        if len(members) < 2:
            continue
        # Neighbours outside an image's duplicate group: at most the members outside the largest group.
        k = min(n_neighbors, len(members) - int(np.unique(components[members], return_counts=True)[1].max()))
        if k < 1:  # no spread to measure: one image, or one group of copies
            continue
        # Skip the image itself and its duplicates: a twin must not hide an outlier.
        index = NearestNeighbors().fit(unit[members])
        distance, _ = nearest_outside_group(index, components[members], unit, components, k)
        nearest = (distance ** 2 / 2.0).mean(axis=1)  # cosine distance on unit vectors
        q1, q3 = np.quantile(nearest[members], [0.25, 0.75])
        fence = max(q3 + OUTLIER_IQR * (q3 - q1), 1e-12)
        ratio = np.minimum(ratio, nearest / fence)
    indices = np.flatnonzero(ratio > 1.0)
    indices = indices[np.argsort(-ratio[indices], kind="stable")]
    return indices, ratio[indices]


# --------------------------------------------------------------------------
# The public function

def _check_cv(cv, y, random_state):
    from sklearn.model_selection import StratifiedGroupKFold, check_cv

    if isinstance(cv, numbers.Integral) and not isinstance(cv, bool):
        if cv < 2:
            raise ValueError(f"cv={cv} must be at least 2 (the number of folds).")
        classes, counts = np.unique(y, return_counts=True)
        if counts.min() < cv:
            raise ValueError(
                f"class {classes.tolist()[counts.argmin()]!r} has {counts.min()} image(s), fewer than cv={cv} "
                "folds: every image needs an out-of-fold prediction. Add images or lower cv."
            )
        # Stratified, and each duplicate group (the groups audit passes) kept within one fold.
        return StratifiedGroupKFold(cv, shuffle=True, random_state=random_state)
    if hasattr(cv, "split"):
        return check_cv(cv, y, classifier=True)
    raise ValueError(f"cv={cv!r} must be a number of folds (int >= 2) or a scikit-learn splitter.")


def _takes_groups(splitter):
    """Whether ``splitter.split`` uses ``groups`` (scikit-learn's group splitters request them);
    passing groups to the others only makes them warn."""
    try:
        return splitter.get_metadata_routing().split.requests.get("groups") is True
    except AttributeError:  # a splitter of one's own, without scikit-learn's metadata routing
        return False


def audit(estimator, X, y, *, cv=5, X_test=None, y_test=None, duplicate_threshold="auto",
          n_neighbors=5, random_state=0, verbose=0):
    """Find suspected label errors, duplicates, train/test leakage and outliers in labelled images.

    The images are embedded once with ``estimator``'s backbone (features are
    cached, so this is free for a folder embedded before); the audit then
    costs the head fits of one cross-validation
    (``cross_val_predict(estimator, X, y, groups=..., cv=cv, method="predict_proba")``,
    the duplicate groups held out together) and nearest-neighbour searches
    in feature space. Suspected label errors
    are found (confident learning) on the head's out-of-fold probabilities
    combined with a vote of each image's ``round(sqrt(n))`` nearest
    neighbours (docs/audit.md).

    Parameters
    ----------
    estimator : PretrainedImageClassifier or None
        The classifier (unfitted; it is cloned) whose out-of-fold
        probabilities judge the labels, and whose backbone gives the
        features. None: ``PretrainedImageClassifier(random_state=random_state)``.
    X : sequence of images
        Paths, encoded bytes, PIL images or uint8 arrays.
    y : array-like of shape (n_images,)
        The given label of each image.
    cv : int or cross-validation splitter, default=5
        Folds of the cross-validation. An int: stratified, shuffled with
        ``random_state``, and each duplicate group held out together
        (``StratifiedGroupKFold``), so a copy never teaches the head its
        twin's label. A splitter is given the duplicate groups as
        ``groups`` (used by group splitters such as ``GroupKFold``).
    X_test : sequence of images or None, default=None
        A held-out set to check for leakage: images of ``X`` duplicated in it.
    y_test : array-like or None, default=None
        Labels of ``X_test`` (which it needs), shown beside leakage findings.
    duplicate_threshold : float or "auto", default="auto"
        Cosine similarity of features from which two images are duplicates
        (so are images whose perceptual hashes differ in at most
        ``HASH_DISTANCE`` = 24 of 255 bits, whatever this threshold).
        "auto": ``1 - 0.35 * m``, where ``m`` is the median cosine distance of
        an image to its third-nearest neighbour in ``X`` and ``X_test`` (0.857
        for the household-waste photos of trash6, 0.972 for the hands of sign_digits; docs/audit.md has the measurements
        behind it). A fixed value suits folders you know.
    n_neighbors : int, default=5
        Neighbours per class in the outlier distance.
    random_state : int, RandomState or None, default=0
        Seeds the folds (and the default estimator).
    verbose : int, default=0
        Report the stages and show an embedding progress bar on stderr when > 0.

    Returns
    -------
    report : AuditReport

    Examples
    --------
    >>> from sktransfer import PretrainedImageClassifier, audit, load_image_folder
    >>> X, y = load_image_folder("sktransfer/data/trash_sample")
    >>> report = audit(PretrainedImageClassifier(random_state=0), X[::3], y[::3], cv=3)
    >>> list(report.to_frame().columns)
    ['path', 'finding', 'given_label', 'suggested_label', 'score', 'group', 'split']
    """
    from sklearn.base import clone, is_classifier
    from sklearn.model_selection import cross_val_predict
    from sklearn.utils.multiclass import check_classification_targets, type_of_target

    from ._estimator import PretrainedImageClassifier
    from ._images import open_image

    if estimator is None:
        estimator = PretrainedImageClassifier(random_state=random_state)
    if not (is_classifier(estimator) and hasattr(estimator, "_make_embedder")):
        raise TypeError(
            f"estimator must be a PretrainedImageClassifier (or None for the default one), "
            f"got {type(estimator).__name__}: the audit needs its backbone's features."
        )
    items = as_image_list(X)
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(items):
        raise ValueError(f"y must hold one label per image: X has {len(items)} images, y has shape {y.shape}.")
    check_classification_targets(y)
    if type_of_target(y) not in ("binary", "multiclass") or len(np.unique(y)) < 2:
        classes = np.unique(y).tolist()
        raise ValueError(f"y has a single class ({classes[0]!r}); the audit cross-validates a classifier, which "
                         "needs at least two." if len(classes) == 1 else
                         f"y must have at least 2 classes to cross-validate; it has {classes}.")
    test_items = [] if X_test is None else as_image_list(X_test, name="X_test")
    if y_test is not None:
        y_test = np.asarray(y_test)
        if X_test is None:
            raise ValueError(f"y_test was given without X_test ({_count(y_test.size, 'label')}): pass the "
                             "held-out images as X_test, or leave y_test out.")
        if y_test.shape != (len(test_items),):
            raise ValueError(f"y_test must hold one label per image of X_test ({len(test_items)}), "
                             f"got shape {y_test.shape}.")
    if not (duplicate_threshold == "auto" or isinstance(duplicate_threshold, numbers.Real)
            and not isinstance(duplicate_threshold, bool) and 0.0 < duplicate_threshold <= 1.0):
        raise ValueError(f"duplicate_threshold={duplicate_threshold!r} must be a cosine similarity in (0, 1] "
                         "or 'auto'.")
    if not (isinstance(n_neighbors, numbers.Integral) and n_neighbors >= 1):
        raise ValueError(f"n_neighbors={n_neighbors!r} must be a positive integer.")
    splitter = _check_cv(cv, y, random_state)
    # The settings the head refuses for these labels, or for a training fold of them (each image
    # its own group: the duplicate groups are known only once the images are embedded).
    groups = np.arange(len(y)) if _takes_groups(splitter) else None
    estimator._check_fit_settings(y, [train for train, _ in splitter.split(items, y, groups=groups)], f"cv={cv!r}")

    say = (lambda text: print(f"audit: {text}", file=sys.stderr, flush=True)) if verbose else (lambda text: None)
    everything = items + test_items
    say(f"embedding {len(everything)} images (cached ones are read, not recomputed)")
    embedder = clone(estimator)._make_embedder().set_params(verbose=int(verbose > 0)).fit()
    # Every bad image is reported here, before any training; X_test (usually
    # the smaller) first, so its bad images are told before X is embedded.
    test_features = embedder._embed_items(test_items, "X_test") if test_items else None
    features = embedder._embed_items(items, "X")
    if test_features is not None:
        features = np.vstack([features, test_features])
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = features / np.where(norms > 0, norms, 1.0)

    say("searching nearest neighbours for duplicates")
    digests, hashes = [], []
    errors = []
    for i, item in enumerate(everything):
        try:
            digest, payload = read_item(item)
            # One decode (a reduced-scale one for large JPEGs) gives the perceptual hash.
            hashes.append(perceptual_hash(open_image(payload, min_size=2 * HASH_THUMBNAIL)))
            digests.append(digest)
        except (OSError, ValueError, TypeError) as e:  # changed on disk since it was embedded
            errors.append((i, item, error_reason(e)))
    if errors:
        n = len(items)
        in_x = [(i, item, reason) for i, item, reason in errors if i < n]
        raise ImageInputError(in_x, "X") if in_x else ImageInputError(
            [(i - n, item, reason) for i, item, reason in errors], "X_test")
    if duplicate_threshold == "auto":
        duplicate_threshold = auto_threshold(unit)
    components, best = duplicate_components(unit, digests, np.array(hashes), float(duplicate_threshold))
    n = len(items)

    # The copies of an image are held out together: a copy in the training
    # folds would teach the head its twin's label, right or wrong.
    groups = components[:n] if _takes_groups(splitter) else None
    n_folds = splitter.get_n_splits(items, y, groups=groups)
    say(f"cross-validating the head ({n_folds} fits on cached features)")
    proba = cross_val_predict(clone(estimator), items, y, groups=groups, cv=splitter, method="predict_proba")
    classes = np.unique(y)
    y_enc = np.searchsorted(classes, y)

    say("searching nearest neighbours for outliers and the neighbours' labels")
    duplicate_groups, leakage_groups = [], []
    order = np.argsort(components, kind="stable")
    for group in np.split(order, np.flatnonzero(np.diff(components[order])) + 1):
        if len(group) < 2:
            continue
        train, test = group[group < n], group[group >= n] - n
        if len(train) and len(test):
            leakage_groups.append((train, test))
        elif len(train) > 1:
            duplicate_groups.append(train)
    outliers, outlier_scores = class_outliers(unit[:n], y_enc, len(classes), components[:n], n_neighbors)
    # The head's out-of-fold evidence and the neighbours' vote, with duplicates left out of it.
    votes = neighbour_proba(unit[:n], y_enc, len(classes), components[:n])
    label_proba = combine_evidence(proba, votes)
    issues, suggested, label_scores, thresholds = find_label_issues(y_enc, label_proba)
    # A group whose copies carry different labels is judged as a whole, its certain issues first.
    in_x = groups_in_x(duplicate_groups, leakage_groups)
    conflicts, conflict_suggested, conflict_scores = label_conflicts(in_x, y_enc, label_proba)
    others = ~np.isin(issues, [i for m in in_x if mixed_labels(m, y_enc) for i in m])
    issues = np.concatenate([conflicts, issues[others]])
    suggested = np.concatenate([conflict_suggested, suggested[others]])
    label_scores = np.concatenate([conflict_scores, label_scores[others]])
    return AuditReport(
        items, y, test_items, y_test, classes=classes, oof_proba=proba, neighbour_proba=votes,
        label_proba=label_proba, thresholds=thresholds,
        duplicate_threshold=float(duplicate_threshold),
        label_issues=issues, suggested_labels=classes[suggested], label_scores=label_scores,
        duplicate_groups=duplicate_groups, duplicate_scores=best, leakage_groups=leakage_groups,
        outliers=outliers, outlier_scores=outlier_scores,
    )
