"""How many epochs the head needs: held-out accuracy against ``max_epochs``.

The evidence behind the classifier's default ``max_epochs``. For each
dataset and training-set size, a seeded stratified subset is split several
times (StratifiedShuffleSplit); every split trains a linear and an MLP head
for each number of epochs and scores it on the rest of the subset. The
images are embedded once (the process-wide feature cache serves every fit
after the first), so the sweep costs one backbone pass per photo.

    python benchmarks/epochs.py [--splits 4] [--write]
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import DATASETS, machine, stratified_subset, write_section
from sklearn.model_selection import StratifiedShuffleSplit

from sktransfer import PretrainedImageClassifier

EPOCHS = (10, 15, 20, 30)
HEADS = {"linear": (), "MLP (256)": (256,)}
SETTINGS = (("flowers5", 50), ("flowers5", 200), ("sign_digits", 50), ("sign_digits", 200))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", type=int, default=800, help="photos per dataset (train + test)")
    parser.add_argument("--splits", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()

    rows = []
    for name, n_train in SETTINGS:
        X, y = stratified_subset(DATASETS / name, args.subset, seed=1)
        X = np.array(X, dtype=object)
        scores = {}
        splitter = StratifiedShuffleSplit(args.splits, train_size=n_train, random_state=0)
        for seed, (train, test) in enumerate(splitter.split(X, y)):
            for head, hidden in HEADS.items():
                for epochs in EPOCHS:
                    model = PretrainedImageClassifier(max_epochs=epochs, hidden_units=hidden, random_state=seed)
                    model.fit(list(X[train]), y[train])
                    scores.setdefault(head, {}).setdefault(epochs, []).append(
                        model.score(list(X[test]), y[test]))
        for head, by_epochs in scores.items():
            cells = [f"{np.mean(by_epochs[e]):.3f}" for e in EPOCHS]
            rows.append(f"| {name} | {n_train} | {len(X) - n_train} | {head} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)

    table = [
        f"Held-out accuracy, mean over {args.splits} seeded stratified splits of a {args.subset}-photo "
        f"subset of each dataset; efficientnet_lite0, default head settings but `max_epochs`; {machine()}. "
        "`python benchmarks/epochs.py`.",
        "",
        "| dataset | train | test | head | " + " | ".join(f"{e} epochs" for e in EPOCHS) + " |",
        "|---|---:|---:|---|" + "---:|" * len(EPOCHS),
        *rows,
    ]
    print("\n".join(table))
    if args.write:
        write_section("epochs", "## Epochs of head training\n\n" + "\n".join(table))


if __name__ == "__main__":
    main()
