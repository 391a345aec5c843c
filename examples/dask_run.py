"""A grid search spread over Dask workers, the features shared through a disk cache.

    python examples/dask_run.py [DATA_DIR] [--per-class N] [--cache-dir DIR]

Starts a local Dask cluster of two single-threaded worker processes; point
distributed.Client at a real cluster's scheduler instead to use one. The
images are embedded once, here, into a disk cache that every worker then
reads (on a real cluster, put --cache-dir on storage all machines share).
"""

import argparse
import tempfile
from pathlib import Path

import joblib
import numpy as np
from dask.distributed import Client, LocalCluster
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from sktransfer import ImageEmbedder, PretrainedImageClassifier, load_image_folder

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
    parser.add_argument("--cache-dir", help="disk feature cache (default: a temporary folder)")
    parser.add_argument("--max-epochs", type=int, default=20, help="epochs of head training (default: 20)")
    args = parser.parse_args()
    X, y = load(args.data, args.per_class)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="sktransfer-features-")

    ImageEmbedder(cache_dir=cache_dir).fit().transform(X)  # each image through the backbone once
    clf = PretrainedImageClassifier(max_epochs=args.max_epochs, cache_dir=cache_dir, random_state=0)
    grid = {"hidden_units": [(), (32,)], "dropout": [0.0, 0.5]}
    search = GridSearchCV(clf, grid, cv=StratifiedKFold(3, shuffle=True, random_state=0), n_jobs=-1)

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    with cluster, Client(cluster) as client:
        print(f"Dask cluster with {len(client.scheduler_info()['workers'])} workers: {client.dashboard_link}")
        with joblib.parallel_backend("dask"):
            search.fit(X, y)
    print(f"{len(X)} images; best cross-validated accuracy {search.best_score_:.3f} with {search.best_params_}")
    print(f"refit model predicts: {search.predict(X[:3]).tolist()}")


if __name__ == "__main__":
    main()
