"""Grid search over the head's settings; the backbone runs once per image for the whole search.

    python examples/grid_search.py [DATA_DIR] [--per-class N] [--cache-dir DIR]

Features are cached by image content: in memory for this process, and in
--cache-dir (a folder) when given, so a second run skips the backbone too.
"""

import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from sktransfer import PretrainedImageClassifier, cache_info, load_image_folder

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
    parser.add_argument("--cache-dir", help="folder of a disk feature cache, kept between runs")
    parser.add_argument("--max-epochs", type=int, default=30, help="epochs of head training (default: 30)")
    args = parser.parse_args()
    X, y = load(args.data, args.per_class)

    clf = PretrainedImageClassifier(max_epochs=args.max_epochs, cache_dir=args.cache_dir, random_state=0)
    grid = {"hidden_units": [(), (64,)], "dropout": [0.0, 0.5]}
    search = GridSearchCV(clf, grid, cv=StratifiedKFold(3, shuffle=True, random_state=0))
    start = time.perf_counter()
    search.fit(X, y)
    print(f"{len(X)} images, {len(search.cv_results_['params'])} candidates x 3 folds "
          f"in {time.perf_counter() - start:.1f} s")
    print(f"features in the memory cache: {cache_info()['entries']} (one per image)")
    print(f"best cross-validated accuracy: {search.best_score_:.3f} with {search.best_params_}")
    order = np.argsort(search.cv_results_["rank_test_score"], kind="stable")
    for i in order[:4]:
        print(f"  {search.cv_results_['mean_test_score'][i]:.3f}  {search.cv_results_['params'][i]}")


if __name__ == "__main__":
    main()
