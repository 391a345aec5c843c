"""Predict a number from a photo: the sign-language digit shown, as a number.

    python examples/regression.py [DATA_FOLDER] [--per-class N]

DATA_FOLDER has one sub-folder per digit (default: ../shared/datasets/sign_digits
next to the project). The digit is treated as a quantity, so near misses
(predicting 6.5 for a 7) cost less than far ones; R² is reported on held-out photos.
"""

import argparse
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from sktransfer import PretrainedImageRegressor, load_image_folder

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "sign_digits"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default=DEFAULT, help="folder with one sub-folder per digit")
    parser.add_argument("--per-class", type=int, default=None, help="use only N photos per digit (quick run)")
    args = parser.parse_args()

    paths, labels = load_image_folder(args.data)
    if args.per_class:
        keep = [i for c in np.unique(labels) for i in np.flatnonzero(labels == c)[:args.per_class]]
        paths, labels = [paths[i] for i in keep], labels[keep]
    y = labels.astype(float)
    X_train, X_test, y_train, y_test = train_test_split(paths, y, test_size=0.3, random_state=0, stratify=labels)

    reg = PretrainedImageRegressor(hidden_units=(64,), random_state=0).fit(X_train, y_train)
    pred = reg.predict(X_test)
    print(f"{len(X_train)} training photos, {len(X_test)} held out")
    print(f"R² on held-out photos: {reg.score(X_test, y_test):.3f}")
    print(f"mean absolute error: {np.abs(pred - y_test).mean():.2f} (digits)")
    for path, true, guess in list(zip(X_test, y_test, pred))[:5]:
        print(f"  {Path(path).parent.name}/{Path(path).name}: true {true:.0f}, predicted {guess:.1f}")


if __name__ == "__main__":
    main()
