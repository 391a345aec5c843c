"""The ``sktransfer`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent / "data" / "flowers_sample"


def _demo(args):
    import joblib
    import numpy as np
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    from . import PretrainedImageClassifier, load_image_folder

    X, y = load_image_folder(SAMPLE)
    print(f"Bundled sample: {len(X)} flower photos, classes {', '.join(sorted(set(y)))}")
    clf = PretrainedImageClassifier(random_state=0)
    start = time.perf_counter()
    scores = cross_val_score(clf, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0))
    print(f"5-fold cross-validated accuracy: {scores.mean():.3f} ± {scores.std():.3f} "
          f"({time.perf_counter() - start:.1f} s, backbone {clf.backbone})")
    clf.fit(X, y)
    joblib.dump(clf, args.output)
    loaded = joblib.load(args.output)
    same = np.array_equal(loaded.predict_proba(X), clf.predict_proba(X))
    print(f"Saved to {args.output} and loaded back: predictions identical = {same}")
    for path, label in zip(X[::30], loaded.predict(X[::30])):
        print(f"  {Path(path).parent.name}/{Path(path).name} -> {label}")
    return 0 if same else 1


def build_parser():
    parser = argparse.ArgumentParser(
        prog="sktransfer",
        description="Transfer learning for images with a frozen pretrained backbone.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser("demo", help="train on the bundled photo sample, save, reload, predict")
    demo.add_argument("-o", "--output", default="sktransfer-demo.joblib", help="where to save the model")
    demo.set_defaults(run=_demo)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:
        print(f"sktransfer {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
