"""Images beside ordinary table columns: a ColumnTransformer on a DataFrame.

    python examples/images_and_tabular.py [DATA_DIR] [--per-class N]

The image column goes through ImageEmbedder (and PCA to a few components);
numeric and categorical columns are handled as usual; a
HistGradientBoostingClassifier sees them all. The table columns here are
real file metadata: size on disk and the photo's orientation (portrait,
landscape or square).
"""

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from PIL import Image
from sklearn.preprocessing import OneHotEncoder

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


def table(paths):
    """One row per image: its path and a few columns of metadata."""
    rows = []
    for path in paths:
        with Image.open(path) as image:  # reads the header only
            w, h = image.size
        rows.append({
            "path": path,
            "kilobytes": os.path.getsize(path) / 1024,
            "orientation": "portrait" if h > w else "landscape" if w > h else "square",
        })
    return pd.DataFrame(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", help="folder with one sub-folder per class")
    parser.add_argument("--per-class", type=int, help="use only this many images per class")
    args = parser.parse_args()
    paths, y = load(args.data, args.per_class)
    frame = table(paths)
    print(frame.head(3).to_string(index=False))

    columns = ColumnTransformer([
        # A column name as a string (not a list) hands the transformer a 1-D column of paths.
        ("image", make_pipeline(ImageEmbedder(), PCA(n_components=8, random_state=0)), "path"),
        ("numbers", "passthrough", ["kilobytes"]),
        ("kinds", OneHotEncoder(handle_unknown="ignore"), ["orientation"]),
    ])
    # min_samples_leaf below the default of 20 lets the trees split on small data sets.
    model = make_pipeline(columns, HistGradientBoostingClassifier(max_iter=50, min_samples_leaf=5, random_state=0))
    scores = cross_val_score(model, frame, y, cv=3)
    print(f"{len(frame)} rows; 3-fold cross-validated accuracy: {scores.mean():.3f} ± {scores.std():.3f}")
    metadata_only = make_pipeline(
        ColumnTransformer([("numbers", "passthrough", ["kilobytes"]),
                           ("kinds", OneHotEncoder(handle_unknown="ignore"), ["orientation"])]),
        HistGradientBoostingClassifier(max_iter=50, min_samples_leaf=5, random_state=0),
    )
    print(f"the same without the image column: {cross_val_score(metadata_only, frame, y, cv=3).mean():.3f}")


if __name__ == "__main__":
    main()
