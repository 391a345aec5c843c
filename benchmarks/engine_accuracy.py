"""Held-out accuracy of the default classifier on each engine and precision this machine offers.

For each dataset (the seeded, stratified split of ``accuracy.py``), the
default PretrainedImageClassifier is fitted and scored with
``engine="torch", precision="float32"`` and with every other path the
machine runs natively (OpenVINO float32; bfloat16 where the CPU has it),
each from an empty feature cache. A second table tells how close each
path keeps the test photos' features to PyTorch float32's (the cosine
similarity of each photo's pair of feature vectors, pooled over the
datasets), the agreement ``engine="auto"`` promises for what it picks
(``MIN_COSINE``). The tables are written into
docs/benchmarks.md between ``<!-- engine-accuracy:start -->`` and
``<!-- engine-accuracy:end -->``.

Run from the project root: ``python benchmarks/engine_accuracy.py [--train 40 --test 40]``.
"""

from __future__ import annotations

import argparse

import numpy as np
from accuracy import split
from throughput import cpu_line, plans_offered

from _common import DATASETS, add_section_option, machine, write_figures
from sktransfer import ImageEmbedder, PretrainedImageClassifier, clear_cache
from sktransfer._engine import MIN_COSINE


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=40, help="training photos per class")
    parser.add_argument("--test", type=int, default=40, help="test photos per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", default="flowers5,sign_digits,trash6")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    add_section_option(parser)
    args = parser.parse_args()

    plans = plans_offered()  # torch float32 first: the reference of the cosines
    rows, cosines = [], {plan: [] for plan in plans}
    for name in args.datasets.split(","):
        X, y, X_test, y_test = split(DATASETS / name, args.train, args.test, args.seed)
        scores, features = [], []
        for engine, precision in plans:
            clear_cache()
            clf = PretrainedImageClassifier(random_state=args.seed, engine=engine, precision=precision)
            scores.append(clf.fit(X, y).score(X_test, y_test))
            features.append(ImageEmbedder(engine=engine, precision=precision).fit().transform(X_test))
        for plan, Z in zip(plans, features):
            cosines[plan].append(cosine(features[0], Z))
        rows.append(f"| {name} | {len(X)} / {len(X_test)} | " + " | ".join(f"{s:.3f}" for s in scores)
                    + f" | {100 * (max(scores) - min(scores)):.1f} |")
        print(rows[-1], flush=True)
    table = "\n".join([
        f"{machine()}; {cpu_line()}. Default classifier, seed {args.seed}; accuracy on the held-out photos.",
        "",
        "| dataset | train / test photos | " + " | ".join(f"{e} {p}" for e, p in plans) + " | spread (points) |",
        "|---|---|" + "---:|" * (len(plans) + 1),
        *rows,
    ])
    agreement = [
        "",
        f"Agreement with torch float32 on the same {sum(len(c) for c in cosines[plans[0]])} test photos: "
        f"cosine similarity of each photo's features (\"auto\" picks only paths within {MIN_COSINE}).",
        "",
        "| path | least cosine | 1st percentile | mean |",
        "|---|---:|---:|---:|",
    ]
    for (engine, precision), values in cosines.items():
        c = np.concatenate(values)
        agreement.append(f"| {engine} {precision} | {c.min():.5f} | {np.percentile(c, 1):.5f} | {c.mean():.5f} |")
    table += "\n" + "\n".join(agreement)
    print(table)
    if not args.no_write:
        write_figures("engine-accuracy", "## Accuracy by engine and precision", table, args.section)


def cosine(A, B):
    """The cosine similarity of each row of ``A`` with the same row of ``B``."""
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    return (A * B).sum(1) / (np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1))


if __name__ == "__main__":
    main()
