"""Accuracy levers against the usual skorch fine-tuning pattern.

For each dataset (seeded, stratified train/test split of a class-per-folder
image set), fits:

* default: frozen backbone + linear head;
* + MLP head; + augment (K cached views); + TTA; + unfreeze (last block);
  + temperature calibration;
* skorch peer: a NeuralNetClassifier whose module holds the backbone, frozen
  with skorch's ``Freezer`` callback, trained on an image Dataset with
  random crops and flips, so the backbone runs on every image every epoch.

and prints test accuracy, expected calibration error (15 bins), fit and
predict seconds and backbone passes (images through the backbone's stem,
fit and predict together; every row starts from an empty feature cache).
The table is written into docs/benchmarks.md between
``<!-- accuracy:start -->`` and ``<!-- accuracy:end -->``.

With ``--probes``, instead: the default classifier against
``LogisticRegressionCV`` and the default regressor against ``RidgeCV`` on the
same standardised features of ``trash6``, ``sign_digits`` and ``flowers5``
(seeded splits; regression targets: the digit shown, else the photo's mean
brightness), and the seconds of one linear-head fit on 1,000 cached feature
rows; written between ``<!-- head:start -->`` and ``<!-- head:end -->``.

With ``--fit-timing``, only that last figure, printed.

Run from the project root: ``python benchmarks/accuracy.py [--full | --probes | --fit-timing]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import torch

from sktransfer import PretrainedImageClassifier, clear_cache, load_image_folder
from sktransfer._backbones import build_backbone

from _common import DATASETS, Counter, Passes, machine, stratified_subset, write_section


def split(folder, n_train, n_test, seed):
    """Seeded stratified split: ``n_train`` and ``n_test`` random photos of each class."""
    paths, labels = load_image_folder(folder)
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in sorted(set(labels)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train += idx[:n_train].tolist()
        test += idx[n_train:n_train + n_test].tolist()
    return [paths[i] for i in train], labels[train], [paths[i] for i in test], labels[test]


def expected_calibration_error(proba, y_true, classes, bins=15):
    """Gap between confidence and accuracy, averaged over confidence bins (weighted by size)."""
    confidence = proba.max(axis=1)
    correct = classes[proba.argmax(axis=1)] == y_true
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return ece


def run_sktransfer(params, X, y, X_test, y_test):
    clear_cache()
    counter = Passes()
    t0 = time.perf_counter()
    clf = PretrainedImageClassifier(random_state=0, **params).fit(X, y)
    t1 = time.perf_counter()
    proba = clf.predict_proba(X_test)
    t2 = time.perf_counter()
    counter.remove()
    pred = clf.classes_[proba.argmax(axis=1)]
    return dict(accuracy=np.mean(pred == y_test), ece=expected_calibration_error(proba, y_test, clf.classes_),
                fit_s=t1 - t0, predict_s=t2 - t1, passes=counter.images)


def run_skorch_peer(X, y, X_test, y_test, epochs):
    """The usual skorch transfer-learning pattern: backbone inside the module, Freezer, image Dataset."""
    from PIL import Image
    from skorch import NeuralNetClassifier
    from skorch.callbacks import Freezer
    from torchvision import transforms as T

    backbone = build_backbone("efficientnet_lite0")
    prep = backbone.preprocessing
    interp = T.InterpolationMode(prep.interpolation)
    normalize = [T.ToTensor(), T.Normalize(prep.mean, prep.std)]
    train_tf = T.Compose([T.RandomResizedCrop(prep.crop_size, interpolation=interp), T.RandomHorizontalFlip(),
                          *normalize])
    test_tf = T.Compose([T.Resize(prep.resize_size, interpolation=interp), T.CenterCrop(prep.crop_size),
                         *normalize])

    class Images(torch.utils.data.Dataset):
        def __init__(self, paths, targets, transform):
            self.paths, self.targets, self.transform = paths, targets, transform

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            image = Image.open(self.paths[i])
            image.draft("RGB", (prep.resize_size, prep.resize_size))
            return self.transform(image.convert("RGB")), self.targets[i]

    classes = np.array(sorted(set(y)))
    y_enc = np.searchsorted(classes, y)
    body = copy.deepcopy(backbone.module.net).train()
    module = torch.nn.Sequential()
    module.add_module("backbone", body)
    module.add_module("classifier", torch.nn.Linear(backbone.num_features, len(classes)))
    counter = Counter(body.conv_stem)
    torch.manual_seed(0)
    net = NeuralNetClassifier(
        # The skorch transfer-learning tutorial uses SGD (lr 0.001, momentum 0.9) with batches of 4;
        # with batches of 16 and a few epochs that undertrains, so the peer gets AdamW (lr 1e-3),
        # the optimizer sktransfer's head uses.
        module, criterion=torch.nn.CrossEntropyLoss, optimizer=torch.optim.AdamW, lr=1e-3,
        batch_size=16, max_epochs=epochs, train_split=None,
        iterator_train__shuffle=True, callbacks=[("freezer", Freezer("backbone.*"))], verbose=0,
    )
    t0 = time.perf_counter()
    net.fit(Images(X, y_enc, train_tf), None)
    t1 = time.perf_counter()
    proba = net.predict_proba(Images(X_test, np.zeros(len(X_test), dtype=np.int64), test_tf))
    t2 = time.perf_counter()
    counter.handle.remove()
    pred = classes[proba.argmax(axis=1)]
    return dict(accuracy=np.mean(pred == y_test), ece=expected_calibration_error(proba, y_test, classes),
                fit_s=t1 - t0, predict_s=t2 - t1, passes=counter.images)


def _probe_data(name, n, cache_dir):
    """Paths, labels, a numeric target and cached features of a seeded stratified subset of ``name``."""
    from PIL import Image

    from sktransfer import ImageEmbedder

    X, y = stratified_subset(DATASETS / name, n)
    if name == "sign_digits":
        target = y.astype(float)  # the digit shown
    else:  # no number comes with these photos: their mean brightness
        target = np.array([np.asarray(Image.open(p).convert("L").resize((64, 64))).mean() for p in X])
    Z = ImageEmbedder(cache_dir=cache_dir).fit_transform(X)
    return X, y, target, Z


def probe_rows(name, n, seeds, cache_dir):
    """The default heads (``weight_decay="auto"``: tuned) against LogisticRegressionCV and RidgeCV on the
    same standardised features, and the classifier with the earlier default (AdamW, weight decay 1e-4)."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.model_selection import train_test_split

    from sktransfer import PretrainedImageRegressor
    from sktransfer._head import feature_statistics

    X, y, target, Z = _probe_data(name, n, cache_dir)
    rows = []
    for seed in seeds:
        train, test = train_test_split(np.arange(len(X)), test_size=0.3, stratify=y, random_state=seed)
        Xtr, Xte = [X[i] for i in train], [X[i] for i in test]
        mean, scale = feature_statistics(Z[train])
        S = (Z - mean) / scale
        t0 = time.perf_counter()
        clf = PretrainedImageClassifier(cache_dir=cache_dir, random_state=0).fit(Xtr, y[train])
        acc = clf.score(Xte, y[test])
        t1 = time.perf_counter()
        adamw = PretrainedImageClassifier(optimizer=torch.optim.AdamW, weight_decay=1e-4, cache_dir=cache_dir,
                                          random_state=0).fit(Xtr, y[train]).score(Xte, y[test])
        t1a = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            lr = LogisticRegressionCV(max_iter=2000).fit(S[train], y[train])
        t2 = time.perf_counter()
        r2 = PretrainedImageRegressor(cache_dir=cache_dir, random_state=0).fit(
            Xtr, target[train]).score(
            Xte, target[test])
        t3 = time.perf_counter()
        ridge = RidgeCV(alphas=np.logspace(-3, 4, 15)).fit(S[train], target[train])
        t4 = time.perf_counter()
        # tta costs a backbone pass per test photo: measured on the first split only.
        tta = clf.set_params(tta="flip").score(Xte, y[test]) if seed == seeds[0] else float("nan")
        rows.append(dict(dataset=name, n=f"{len(train)}/{len(test)}", seed=seed, acc=acc, tta=tta, adamw=adamw,
                         lr=lr.score(S[test], y[test]), r2=r2, ridge=ridge.score(S[test], target[test]),
                         fit_clf=t1 - t0, fit_adamw=t1a - t1, fit_lr=t2 - t1a, fit_reg=t3 - t2, fit_ridge=t4 - t3))
        print(rows[-1], flush=True)
    return rows


def linear_fit_seconds(Z, y, repeats=5):
    """Best-of seconds of one head fit on cached features: ``weight_decay="auto"``, a fixed strength
    (L-BFGS, no tuning) and AdamW with the former default weight decay."""
    from sktransfer._head import HeadClassifier, build_head
    from sktransfer._runtime import limited_threads

    params = PretrainedImageClassifier().get_params()
    classes, y_enc = np.unique(y, return_inverse=True)
    task = dict(criterion=torch.nn.CrossEntropyLoss, criterion__reduction="none", classes=np.arange(len(classes)))
    weights = np.ones(len(Z), np.float32)
    out = {}
    for label, settings in (("weight_decay='auto' (the default: tuned)", {"weight_decay": "auto"}),
                            ("weight_decay=0.1 (L-BFGS at that strength)", {"weight_decay": 0.1}),
                            ("weight_decay=0.01", {"weight_decay": 0.01}),
                            ("AdamW, weight_decay=1e-4, 15 epochs", {"optimizer": torch.optim.AdamW,
                                                                     "weight_decay": 1e-4})):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            with limited_threads():
                head = build_head({**params, **settings}, {}, Z, y_enc, weights, len(classes), net=HeadClassifier,
                                  task=task, hidden_units=(), device="cpu", seed=0, stratified=True)
                head.fit({"X": Z, "sample_weight": weights}, y_enc)
            best = min(best, time.perf_counter() - t0)
        out[label] = best
    # scikit-learn's own solver on the same standardised rows, at the same strengths: the head's
    # objective (mean loss + l2 / 2 * |W|^2) is LogisticRegression's with C = 1 / (l2 * n).
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from sktransfer._head import feature_statistics

    mean, scale = feature_statistics(Z)
    standard = ((Z - mean) / scale).astype(np.float32)
    # Each of its solvers that fits a multinomial model without a (k * d)^2 Hessian.
    for solver in ("lbfgs", "newton-cg", "sag", "saga"):
        for l2 in (0.1, 0.01):
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                with threadpool_limits(1), warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    LogisticRegression(C=1 / (l2 * len(Z)), solver=solver, max_iter=1000).fit(standard, y_enc)
                best = min(best, time.perf_counter() - t0)
            out[f"scikit-learn's LogisticRegression at weight_decay={l2}'s strength "
                f"({solver}, float32, its default tol)"] = best
    return out


def fit_timing(cache_dir):
    """The line of :func:`linear_fit_seconds` on 1,000 cached feature rows: sign_digits' 800 and
    200 of flowers5 (the features the probe rows cache)."""
    _, y1, _, Z1 = _probe_data("sign_digits", 800, cache_dir)
    _, y2, _, Z2 = _probe_data("flowers5", 800, cache_dir)
    Z, y = np.concatenate([Z1, Z2[:200]]), np.concatenate([y1.astype(str), y2[:200].astype(str)])
    seconds = linear_fit_seconds(Z, y)
    return (f"One linear-head fit on {len(Z)} cached feature rows ({len(np.unique(y))} classes: "
            "sign_digits' 800 and 200 of flowers5; best of 5, one torch thread, skorch included): "
            + "; ".join(f"{k} {v * 1000:.0f} ms" for k, v in seconds.items()) + ".")


def main_probes(args):
    rows = []
    for name, n in (("trash6", 600), ("sign_digits", 800), ("flowers5", 800)):
        if not (DATASETS / name).is_dir():
            print(f"skipping {name}: ../shared/datasets/{name} not found")
            continue
        rows += probe_rows(name, n, list(range(args.seed, args.seed + args.splits)), args.cache_dir)
    lines = [
        f"Default heads against tuned scikit-learn models on the same features (the classifier's "
        f"standardisation: feature means and one common scale), seeded stratified subsets (trash6: all "
        f"600 photos, the others 800) split 70/30 with seeds {args.seed}-{args.seed + args.splits - 1}; "
        "efficientnet_lite0; "
        f"{machine()}. Regression targets: the digit "
        "for sign_digits, the photo's mean brightness for the others. "
        f"`python benchmarks/accuracy.py --probes --splits {args.splits}`.",
        "",
        "| dataset | train/test | seed | default classifier | + tta='flip' | AdamW, weight_decay=1e-4 "
        "| LogisticRegressionCV | default regressor R² | RidgeCV R² "
        "| fit s: classifier / AdamW / LR-CV / regressor / RidgeCV |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        tta = "" if np.isnan(r["tta"]) else f"{r['tta']:.3f}"
        lines.append(f"| {r['dataset']} | {r['n']} | {r['seed']} | {r['acc']:.3f} | {tta} | {r['adamw']:.3f} "
                     f"| {r['lr']:.3f} | {r['r2']:.3f} | {r['ridge']:.3f} | {r['fit_clf']:.2f} / {r['fit_adamw']:.2f} / "
                     f"{r['fit_lr']:.2f} / {r['fit_reg']:.2f} / {r['fit_ridge']:.2f} |")
    if rows:
        worst_clf = min(r["acc"] - r["lr"] for r in rows)
        worst_reg = min(r["r2"] - r["ridge"] for r in rows)
        lines += ["", f"Smallest margin over all rows: classifier {worst_clf:+.3f} accuracy against "
                      f"LogisticRegressionCV, regressor {worst_reg:+.3f} R² against RidgeCV.", "",
                  "Means over the splits, and how many splits each side wins (the classifier's test sets are "
                  "180-240 photos, so one photo is 0.4-0.6 points):", "",
                  "| dataset | splits | default classifier | LogisticRegressionCV | difference (points) "
                  "| splits above / equal / below | default regressor R² | RidgeCV R² |",
                  "|---|---:|---:|---:|---:|---|---:|---:|"]
        for name in dict.fromkeys(r["dataset"] for r in rows):
            mine = [r for r in rows if r["dataset"] == name]
            diff = np.array([r["acc"] - r["lr"] for r in mine])
            acc, lr = np.mean([r["acc"] for r in mine]), np.mean([r["lr"] for r in mine])
            # Equal within a thousandth: the same number of test photos right.
            above, below = int((diff > 1e-3).sum()), int((diff < -1e-3).sum())
            lines.append(f"| {name} | {len(mine)} | {acc:.4f} | {lr:.4f} | {100 * (acc - lr):+.2f} "
                         f"| {above} / {len(mine) - above - below} / {below} "
                         f"| {np.mean([r['r2'] for r in mine]):.4f} | {np.mean([r['ridge'] for r in mine]):.4f} |")
    if all((DATASETS / n).is_dir() for n in ("sign_digits", "flowers5")):
        lines += ["", fit_timing(args.cache_dir)]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section("head", "## The default head against tuned linear models\n\n" + table)


VARIANTS = [
    ("default (frozen + linear head)", {}),
    ("+ MLP head (256), dropout 0.2", dict(hidden_units=(256,), dropout=0.2)),
    ("+ augment='light', n_views=4", dict(augment="light", n_views=4)),
    ("+ tta='flip'", dict(tta="flip")),
    ("+ tta='flip+shift'", dict(tta="flip+shift")),
    ("+ unfreeze=1", dict(unfreeze=1)),
    ("+ unfreeze=2", dict(unfreeze=2)),
    ("+ calibration='temperature'", dict(calibration="temperature")),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="100 training and 100 test photos per class")
    parser.add_argument("--train", type=int, default=20, help="training photos per class")
    parser.add_argument("--test", type=int, default=20, help="test photos per class")
    parser.add_argument("--peer-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    parser.add_argument("--probes", action="store_true",
                        help="the default heads against LogisticRegressionCV and RidgeCV, and a head fit's seconds")
    parser.add_argument("--splits", type=int, default=3, help="seeded splits per dataset (--probes)")
    parser.add_argument("--cache-dir", default=None, help="feature cache folder (--probes), reused across runs")
    parser.add_argument("--fit-timing", action="store_true",
                        help="print only the seconds of one linear-head fit on 1,000 cached rows (as --probes)")
    args = parser.parse_args()
    if args.fit_timing:
        return print(f"{machine()}. {fit_timing(args.cache_dir)}")
    if args.probes:
        return main_probes(args)
    if args.full:
        args.train, args.test = 100, 100
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lines = [
        f"Seeded stratified splits (seed {args.seed}): {args.train} training and {args.test} test photos "
        f"per class; efficientnet_lite0; {machine()}; seconds are indicative only. Every row starts from an "
        "empty feature cache; passes = images through the backbone (fit + predict). ECE: expected "
        "calibration error, 15 bins. `python benchmarks/accuracy.py" + (" --full" if args.full else "") + "`.",
        "",
        "| dataset | model | test accuracy | ECE | fit s | predict s | backbone passes |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("flowers5", "sign_digits"):
        folder = DATASETS / name
        if not folder.is_dir():
            print(f"skipping {name}: ../shared/datasets/{name} not found")
            continue
        X, y, X_test, y_test = split(folder, args.train, args.test, args.seed)
        runs = [(label, lambda p=params: run_sktransfer(p, X, y, X_test, y_test))
                for label, params in VARIANTS]
        runs.append((f"skorch peer: backbone in module + Freezer, AdamW, {args.peer_epochs} epochs",
                     lambda: run_skorch_peer(X, y, X_test, y_test, args.peer_epochs)))
        for label, run in runs:
            r = run()
            line = (f"| {name} ({len(X)}/{len(X_test)}) | {label} | {r['accuracy']:.3f} | {r['ece']:.3f} | "
                    f"{r['fit_s']:.1f} | {r['predict_s']:.1f} | {r['passes']} |")
            print(line, flush=True)
            lines.append(line)
    table = "\n".join(lines)
    if not args.no_write:
        write_section("accuracy", "## Accuracy levers\n\n" + table)


if __name__ == "__main__":
    main()
