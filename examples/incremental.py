"""Train as photos arrive: partial_fit on batches, and warm_start to train further.

    python examples/incremental.py [DATA_FOLDER] [--per-class N] [--batches K]

DATA_FOLDER has one sub-folder per class (default: ../shared/datasets/flowers5
next to the project). The training photos are split into K batches that
"arrive" one after another; after each pass the held-out accuracy is printed.
"""

import argparse
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from sktransfer import PretrainedImageClassifier, load_image_folder

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "flowers5"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default=DEFAULT, help="folder with one sub-folder per class")
    parser.add_argument("--per-class", type=int, default=None, help="use only N photos per class (quick run)")
    parser.add_argument("--batches", type=int, default=4, help="number of batches the photos arrive in")
    args = parser.parse_args()

    paths, labels = load_image_folder(args.data)
    if args.per_class:
        keep = [i for c in np.unique(labels) for i in np.flatnonzero(labels == c)[:args.per_class]]
        paths, labels = [paths[i] for i in keep], labels[keep]
    X_train, X_test, y_train, y_test = train_test_split(paths, labels, test_size=0.3, random_state=0, stratify=labels)
    classes = np.unique(labels)

    # partial_fit: one epoch per call; the first call names every class and
    # fixes the feature standardisation, so it should be a fair mix of photos.
    clf = PretrainedImageClassifier(random_state=0)
    order = np.random.default_rng(0).permutation(len(X_train))
    for n_pass in range(1, 6):
        for batch in np.array_split(order, args.batches):
            clf.partial_fit([X_train[i] for i in batch], y_train[batch], classes=classes)
        print(f"pass {n_pass}: {len(clf.history_)} epochs, held-out accuracy {clf.score(X_test, y_test):.3f}")

    # warm_start: each fit continues from the current head for max_epochs more epochs.
    warm = PretrainedImageClassifier(max_epochs=5, warm_start=True, random_state=0)
    for _ in range(3):
        warm.fit(X_train, y_train)
        print(f"warm start: {len(warm.history_)} epochs, held-out accuracy {warm.score(X_test, y_test):.3f}")


if __name__ == "__main__":
    main()
