"""Held-out accuracy of the default classifier on each engine and precision this machine offers.

For each dataset (the seeded, stratified split of ``accuracy.py``), the
default PretrainedImageClassifier is fitted and scored with
``engine="torch", precision="float32"`` and with every other path the
machine runs natively (OpenVINO float32; bfloat16 where the CPU has it),
each from an empty feature cache. The table is written into
docs/benchmarks.md between ``<!-- engine-accuracy:start -->`` and
``<!-- engine-accuracy:end -->``.

Run from the project root: ``python benchmarks/engine_accuracy.py [--train 40 --test 40]``.
"""

from __future__ import annotations

import argparse

from accuracy import split
from throughput import cpu_line, plans_offered

from _common import DATASETS, machine, write_section
from sktransfer import PretrainedImageClassifier, clear_cache


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=40, help="training photos per class")
    parser.add_argument("--test", type=int, default=40, help="test photos per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", default="flowers5,sign_digits,trash6")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args()

    plans = plans_offered()
    rows = []
    for name in args.datasets.split(","):
        X, y, X_test, y_test = split(DATASETS / name, args.train, args.test, args.seed)
        scores = []
        for engine, precision in plans:
            clear_cache()
            clf = PretrainedImageClassifier(random_state=args.seed, engine=engine, precision=precision)
            scores.append(clf.fit(X, y).score(X_test, y_test))
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
    print(table)
    if not args.no_write:
        write_section("engine-accuracy", "## Accuracy by engine and precision\n\n" + table)


if __name__ == "__main__":
    main()
