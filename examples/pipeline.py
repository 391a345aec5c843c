"""A scikit-learn Pipeline on image paths: frozen-backbone features, then LogisticRegression.

    python examples/pipeline.py [DATA_DIR] [--per-class N]

DATA_DIR holds one sub-folder of images per class; by default
../shared/datasets/flowers5 beside the repository when present, else the
photo sample bundled with sktransfer.
"""

import argparse
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline

from sktransfer import ImageEmbedder, load_image_folder

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "flowers5"
SAMPLE = REPO / "sktransfer" / "data" / "trash_sample"


def load(data, per_class):
    """Image paths and labels; the first ``per_class`` images of each class when given."""
    paths, labels = load_image_folder(data or (DEFAULT_DATA if DEFAULT_DATA.is_dir() else SAMPLE))
    if per_class:
        keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
        paths, labels = [paths[i] for i in keep], labels[keep]
    return paths, labels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", help="folder with one sub-folder per class")
    parser.add_argument("--per-class", type=int, help="use only this many images per class")
    args = parser.parse_args()
    X, y = load(args.data, args.per_class)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)

    # Any scikit-learn model can sit on the features; the backbone stays frozen.
    model = make_pipeline(ImageEmbedder(), LogisticRegression(max_iter=2000))
    model.fit(X_train, y_train)
    print(f"{len(X_train)} training images, {len(X_test)} test images, classes {sorted(set(y.tolist()))}")
    print(f"test accuracy: {model.score(X_test, y_test):.3f}")
    for path, label in list(zip(X_test, model.predict(X_test)))[:3]:
        print(f"  {Path(path).parent.name}/{Path(path).name} -> {label}")


if __name__ == "__main__":
    main()
