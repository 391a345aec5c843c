"""Tag photos with several labels at once: flower traits derived from the species.

    python examples/multilabel.py [DATA_FOLDER] [--per-class N]

DATA_FOLDER is the flowers5 folder (default: ../shared/datasets/flowers5 next to
the project). Each photo gets the traits of its species (yellow, radial,
cup_shaped); the classifier learns one independent probability per trait.
"""

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import classification_report, f1_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import MultiLabelBinarizer

from sktransfer import PretrainedImageClassifier, load_image_folder

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "flowers5"
TRAITS = {
    "daisy": {"radial"},
    "dandelion": {"yellow", "radial"},
    "rose": {"cup_shaped"},
    "sunflower": {"yellow", "radial"},
    "tulip": {"cup_shaped"},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default=DEFAULT, help="the flowers5 folder (one sub-folder per species)")
    parser.add_argument("--per-class", type=int, default=None, help="use only N photos per species (quick run)")
    args = parser.parse_args()

    paths, species = load_image_folder(args.data)
    if args.per_class:
        keep = [i for c in np.unique(species) for i in np.flatnonzero(species == c)[:args.per_class]]
        paths, species = [paths[i] for i in keep], species[keep]
    binarizer = MultiLabelBinarizer(classes=["yellow", "radial", "cup_shaped"])
    Y = binarizer.fit_transform([TRAITS[s] for s in species])
    X_train, X_test, Y_train, Y_test = train_test_split(paths, Y, test_size=0.3, random_state=0, stratify=species)

    clf = PretrainedImageClassifier(random_state=0).fit(X_train, Y_train)
    pred = clf.predict(X_test)  # a 0/1 matrix, one column per trait
    print(f"{len(X_train)} training photos, {len(X_test)} held out")
    print(f"samples-averaged F1: {f1_score(Y_test, pred, average='samples'):.3f}")
    print(f"subset accuracy (every trait right): {clf.score(X_test, Y_test):.3f}")
    print(classification_report(Y_test, pred, target_names=binarizer.classes_, zero_division=0))
    for path, traits in list(zip(X_test, binarizer.inverse_transform(pred)))[:5]:
        print(f"  {Path(path).parent.name}/{Path(path).name}: {', '.join(traits) or '(none)'}")


if __name__ == "__main__":
    main()
