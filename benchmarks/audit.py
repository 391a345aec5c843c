"""sktransfer.audit on real photos with injected faults; writes the 'audit' section of docs/benchmarks.md.

For each data set: 5% of the labels flipped to another class at random
(seeded), 3% of the photos duplicated (half re-encoded at another JPEG
quality, half resized), and 5 photos of another data set (flowers5) added
under a random label. Reports the recall of the flipped labels at precision
>= 0.5 among the top-ranked suspects, the share of injected duplicates
grouped with their original, and the outsiders flagged, for several seeds;
beside it, every label-issue rule of ``sktransfer._audit.find_label_issues``
on the evidence the audit uses (the head's out-of-fold probabilities and the
neighbours' vote combined), the head's probabilities alone (the rule before
the vote was added), the vote alone, and cleanlab's ``find_label_issues``
(when cleanlab is installed) on the same probabilities. Also measures the duplicate thresholds: the cosine similarity
of re-encoded and resized copies to their original, and the Hamming distance
of their perceptual hashes, against those of each photo's nearest distinct
photo of its class.

    python benchmarks/audit.py [--cache-dir DIR] [--datasets ../shared/datasets] [--seeds 0 1 2 3 4]

writes the 'audit' section (the default head, ``weight_decay="auto"``; when
the seeds include 0 to 4, the default). Other seeds and heads are printed
only; their probabilities can be saved, and the rules compared on them later
without fitting anything:

    python benchmarks/audit.py --cache-dir DIR --seeds 5 6 7 8 9 --save-proba auto.npz
    python benchmarks/audit.py --cache-dir DIR --weight-decay 1e-4 --save-proba adamw.npz
    python benchmarks/audit.py --compare-rules auto.npz adamw.npz

``--backbone efficientnet_lite1`` audits with another backbone's features,
``--data trash6`` one data set only (both printed only).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import DATASETS, machine, write_section  # noqa: E402

from sktransfer import ImageEmbedder, PretrainedImageClassifier, audit, load_image_folder  # noqa: E402
from sktransfer._audit import (  # noqa: E402
    FLAG_RULES, HASH_DISTANCE, HASH_THUMBNAIL, RANK_RULES, combine_evidence, find_label_issues, perceptual_hash)
from sktransfer._images import open_image  # noqa: E402

#: The copies injected as duplicates: JPEG re-encoding at a quality, or a resize (saved at quality 90).
COPIES = {"JPEG quality 75": dict(quality=75), "JPEG quality 50": dict(quality=50),
          "resized to 75%": dict(scale=0.75), "resized to 50%": dict(scale=0.5)}


def copy_of(path, quality=90, scale=None):
    image = Image.open(path).convert("RGB")
    if scale:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def unit(features):
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def hashes(items):
    """Perceptual hashes as the audit computes them (0/1 ints)."""
    return np.array([perceptual_hash(open_image(item, min_size=2 * HASH_THUMBNAIL)) for item in items], dtype=int)


def similarities(folder, embedder, n_copies=30, seed=0):
    """Copies vs. distinct photos: feature similarity to the nearest same-class photo and hash distances."""
    X, y = load_image_folder(folder)
    F = unit(embedder.transform(X))
    S = F @ F.T  # a few thousand photos: the full matrix is small here
    np.fill_diagonal(S, -1.0)
    same = y[:, None] == y[None, :]
    nearest = np.where(same, S, -1.0).max(axis=1)
    H = hashes(X)
    D = H @ (1 - H).T + (1 - H) @ H.T  # Hamming distances
    np.fill_diagonal(D, H.shape[1] + 1)
    nearest_bits = np.where(same, D, H.shape[1] + 1).min(axis=1)
    close_pairs = int(np.triu(D <= HASH_DISTANCE).sum())  # distinct pairs (any classes) the hash would join
    pick = np.random.default_rng(seed).choice(len(X), n_copies, replace=False)
    copies, copy_bits = {}, {}
    for kind, how in COPIES.items():
        encoded = [copy_of(X[i], **how) for i in pick]
        copies[kind] = (unit(embedder.transform(encoded)) * F[pick]).sum(axis=1)
        copy_bits[kind] = (hashes(encoded) != H[pick]).sum(axis=1)
    return nearest, copies, nearest_bits, close_pairs, copy_bits


def recall_at_precision(ranked, truth, precision=0.5):
    """The highest recall of ``truth`` among the first k of ``ranked`` over all k with precision >= ``precision``."""
    hits = np.cumsum([i in truth for i in ranked])
    k = np.arange(1, len(ranked) + 1)
    ok = hits / k >= precision
    return float(hits[ok].max() / len(truth)) if ok.any() else 0.0


def flag_figures(ranked, flipped):
    """Recall @ P>=0.5 of a ranked suspect list, and the size, precision and recall of the whole list."""
    found = set(ranked.tolist())
    return {"recall": recall_at_precision(ranked, flipped), "flagged": len(found),
            "flagged_precision": len(found & flipped) / max(len(found), 1),
            "flagged_recall": len(found & flipped) / len(flipped)}


#: The name of the audit's own rule in the tables, and of the rule before the neighbours' vote was added.
AUDIT_RULE = f"head and neighbours: {FLAG_RULES[0]}, by {RANK_RULES[0]}"
HEAD_RULE = f"head alone: {FLAG_RULES[0]}, by {RANK_RULES[0]}"
CLEANLAB_RULE = "cleanlab find_label_issues, head's probabilities"


def compare_rules(proba, labels, flipped, votes=None):
    """Every label-issue rule on the same out-of-fold probabilities: {rule: flag_figures}.

    The rules of ``find_label_issues`` (which images are suspects x how they
    are ranked) on the evidence the audit uses, the head's probabilities
    combined with the neighbours' ``votes`` (when given: runs saved before
    the vote have none); the audit's rule on the head's probabilities alone
    (as it was before the vote) and on the vote alone; and cleanlab's
    ``find_label_issues`` (its default, noise-rate pruning, ranked by
    self-confidence) when cleanlab is installed.
    """
    flipped = set(np.asarray(flipped).tolist())
    figures = {}
    evidence = {"head alone": proba}
    if votes is not None:
        evidence = {"head and neighbours": combine_evidence(proba, votes), **evidence, "neighbours alone": votes}
    for name, p in evidence.items():
        for flag in FLAG_RULES:
            for rank in RANK_RULES:
                if name != next(iter(evidence)) and (flag, rank) != (FLAG_RULES[0], RANK_RULES[0]):
                    continue  # the other evidence: the audit's rule only
                ranked = find_label_issues(labels, p, flag=flag, rank=rank)[0]
                figures[f"{name}: {flag}, by {rank}"] = flag_figures(ranked, flipped)
    try:
        from cleanlab.filter import find_label_issues as cleanlab_issues
    except ImportError:
        return figures
    ranked = cleanlab_issues(labels, proba, return_indices_ranked_by="self_confidence")
    figures[CLEANLAB_RULE] = flag_figures(ranked, flipped)
    if votes is not None:
        ranked = cleanlab_issues(labels, evidence["head and neighbours"], return_indices_ranked_by="self_confidence")
        figures["cleanlab find_label_issues, head and neighbours"] = flag_figures(ranked, flipped)
    return figures


def rules_table(runs):
    """Markdown: recall @ P>=0.5 (suspects flagged) of every rule on every run
    ``{key: (proba, labels, flipped, votes)}``, with each rule's lowest and mean recall
    and the number of runs at 0.8 or more."""
    figures = {key: compare_rules(*run) for key, run in runs.items()}
    rules = [rule for rule in next(iter(figures.values())) if all(rule in f for f in figures.values())]
    lines = ["| rule | " + " | ".join(figures) + " | lowest | mean | runs ≥ 0.8 |",
             "|---|" + "---|" * (len(figures) + 3)]
    for rule in rules:
        recalls = [figures[key][rule]["recall"] for key in figures]
        cells = [f"{figures[key][rule]['recall']:.2f} ({figures[key][rule]['flagged']})" for key in figures]
        met = sum(r >= 0.8 for r in recalls)
        lines.append(f"| {rule} | " + " | ".join(cells)
                     + f" | {min(recalls):.2f} | {np.mean(recalls):.3f} | {met} of {len(recalls)} |")
    return "\n".join(lines)


#: What --save-proba keeps of each run (files saved before the neighbours' vote lack "votes").
SAVED = ("proba", "labels", "flipped", "votes")


def load_runs(paths):
    """The runs saved with ``--save-proba``: {key: (proba, labels, flipped, votes or None)}, in file order."""
    runs = {}
    for path in paths:
        with np.load(path) as saved:
            for key in dict.fromkeys(name.rsplit("__", 1)[0] for name in saved.files):
                runs[key] = tuple(saved[f"{key}__{part}"] if f"{key}__{part}" in saved.files else None
                                  for part in SAVED)
    return runs


def save_runs(path, runs):
    """Write ``{key: (proba, labels, flipped, votes)}`` to an .npz file (atomically) for ``--compare-rules``."""
    arrays = {f"{key}__{part}": value for key, run in runs.items() for part, value in zip(SAVED, run)}
    path = Path(path)
    partial = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(partial, **arrays)
    partial.replace(path)


def inject(datasets, name, tmp, seed):
    """``name``'s photos with seeded faults: ``X, y, classes, flipped, pairs, outsiders``.

    ``flipped``: indices whose label was flipped (with the copies of flipped
    photos); ``pairs``: (original, copy, kind of copy); ``outsiders``: the
    flowers5 photos added under random labels.
    """
    X, y = load_image_folder(datasets / name)
    y = y.copy()
    classes = np.unique(y)
    n = len(X)
    rng = np.random.default_rng(seed)
    flipped = set(rng.choice(n, round(0.05 * n), replace=False).tolist())
    for i in flipped:
        y[i] = rng.choice(classes[classes != y[i]])
    sources = rng.choice(n, round(0.03 * n), replace=False)
    kinds = list(COPIES)
    pairs = []
    for k, i in enumerate(sources):
        kind = kinds[k % len(kinds)]
        target = tmp / f"{name}-seed{seed}-copy{k}.jpg"
        target.write_bytes(copy_of(X[i], **COPIES[kind]))
        pairs.append((int(i), len(X), kind))
        X.append(str(target))
        y = np.append(y, y[i])
        if i in flipped:
            flipped.add(len(X) - 1)
    outsiders_from, _ = load_image_folder(datasets / "flowers5")
    outsiders = []
    for p in rng.choice(outsiders_from, 5, replace=False):
        outsiders.append(len(X))
        X.append(str(p))
        y = np.append(y, rng.choice(classes))
    return X, y, classes, flipped, pairs, outsiders


def run(datasets, name, cache_dir, tmp, seed=0, weight_decay=None, adamw=False, backbone="efficientnet_lite0"):
    """Audit ``name`` with injected faults; the figures of the benchmark, and the run's probabilities."""
    X, y, classes, flipped, pairs, outsiders = inject(datasets, name, tmp, seed)
    head = {} if weight_decay is None else {"weight_decay": weight_decay}
    if adamw:
        head["optimizer"] = torch.optim.AdamW
    estimator = PretrainedImageClassifier(backbone=backbone, random_state=seed, cache_dir=cache_dir, **head)
    start = time.perf_counter()
    report = audit(estimator, X, y, cv=5, random_state=seed)
    seconds = time.perf_counter() - start
    y_enc = np.searchsorted(classes, y)
    accuracy = float(np.mean(report.oof_proba.argmax(axis=1) == y_enc))

    result = {
        "name": name, "seed": seed, "images": len(X), "flipped": len(flipped), "accuracy": accuracy,
        "seconds": seconds, "threshold": report.duplicate_threshold, **flag_figures(report.label_issues, flipped),
        "saved": (report.oof_proba, y_enc, np.array(sorted(flipped)), report.neighbour_proba),
    }
    groups = {i: g for g, members in enumerate(report.duplicate_groups) for i in members.tolist()}
    grouped = [groups.get(a, -1) == groups.get(b, -2) for a, b, _ in pairs]
    result["duplicates"] = len(pairs)
    result["grouped"] = float(np.mean(grouped))
    result["grouped_by_kind"] = {kind: float(np.mean([g for g, p in zip(grouped, pairs) if p[2] == kind]))
                                 for kind in COPIES}
    injected = {i for a, b, _ in pairs for i in (a, b)}
    result["other_groups"] = sum(1 for m in report.duplicate_groups if not set(m.tolist()) & injected)
    result["outsiders_flagged"] = len(set(outsiders) & set(report.outliers.tolist()))
    result["outsiders_first"] = set(report.outliers[:len(outsiders)].tolist()) == set(outsiders)
    others = [s for i, s in zip(report.outliers, report.outlier_scores) if i not in outsiders]
    result["top_other_score"] = max(others, default=float("nan"))
    result["lowest_outsider_score"] = min((s for i, s in zip(report.outliers, report.outlier_scores)
                                          if i in outsiders), default=float("nan"))
    result["outliers"] = len(report.outliers)
    result["rules"] = compare_rules(*result["saved"])
    print({k: v for k, v in result.items() if k not in ("saved", "rules")}, flush=True)
    return result


#: The seeds docs/benchmarks.md shows at least.
REFERENCE_SEEDS = (0, 1, 2, 3, 4)


def weight_decay(text):
    return text if text == "auto" else float(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="disk feature cache (reruns skip the backbone)")
    parser.add_argument("--datasets", type=Path, default=DATASETS,
                        help="folder holding trash6, sign_digits and flowers5 (default: ../shared/datasets)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(REFERENCE_SEEDS),
                        help="seeds of the injected faults and the folds (default: 0 1 2 3 4)")
    parser.add_argument("--weight-decay", type=weight_decay,
                        help="the head's weight_decay (a number or 'auto'; default: the estimator's)")
    parser.add_argument("--adamw", action="store_true",
                        help="train the head with AdamW (mini-batches; weight_decay is then its decoupled decay)")
    parser.add_argument("--backbone", default="efficientnet_lite0",
                        help="the classifier's backbone (default: efficientnet_lite0, the estimator's)")
    parser.add_argument("--data", nargs="+", choices=("trash6", "sign_digits"), default=["trash6", "sign_digits"],
                        help="data sets to audit (default: both)")
    parser.add_argument("--save-proba", metavar="FILE.npz",
                        help="also save each run's out-of-fold probabilities, labels, flipped indices "
                             "and neighbours' vote")
    parser.add_argument("--compare-rules", metavar="FILE.npz", nargs="+",
                        help="fit nothing: compare the label-issue rules on probabilities saved with --save-proba")
    args = parser.parse_args()
    if args.compare_rules:
        print(rules_table(load_runs(args.compare_rules)))
        return
    # docs/benchmarks.md holds the reference configuration; other ones are printed only.
    reference = (set(REFERENCE_SEEDS) <= set(args.seeds) and args.weight_decay is None and not args.adamw
                 and args.backbone == "efficientnet_lite0" and len(args.data) == 2)
    cpu = machine()
    results, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.data:
            for seed in args.seeds:
                r = run(args.datasets, name, args.cache_dir, Path(tmp), seed, args.weight_decay, args.adamw,
                        args.backbone)
                head = ("" if args.weight_decay is None else f" weight_decay={args.weight_decay}") + \
                    (" AdamW" if args.adamw else "") + \
                    ("" if args.backbone == "efficientnet_lite0" else f" {args.backbone}")
                runs[f"{name} seed {seed}{head}"] = r["saved"]
                results.append(r)
    if args.save_proba:
        save_runs(args.save_proba, runs)
    table = rules_table(runs)
    print(table, flush=True)
    if not reference:
        return
    embedder = ImageEmbedder(cache_dir=args.cache_dir).fit()
    lines = ["## Audit: label errors, duplicates, outliers", "",
             f"`python benchmarks/audit.py` on {cpu}. Backbone efficientnet_lite0, default head "
             "(`weight_decay=\"auto\"`: a tuned linear head), 5 folds"
             + ("; features read from `--cache-dir` where an earlier run stored them (seconds then "
                "exclude the backbone)." if args.cache_dir else "."), "",
             "### Duplicate thresholds", "",
             "Cosine similarity of features: each photo's nearest *distinct* photo of its own class "
             "(quantiles over all photos) against copies of 30 random photos:", "",
             "| data set | distinct: median | 99% | max | " + " | ".join(f"{k}: min / 5%" for k in COPIES) + " |",
             "|---|---|---|---|" + "---|" * len(COPIES)]
    bits = []
    for name in ("trash6", "sign_digits"):
        nearest, copies, nearest_bits, close_pairs, copy_bits = similarities(args.datasets / name, embedder)
        q50, q99, top = np.quantile(nearest, [0.5, 0.99, 1.0])
        lines.append(f"| {name} | {q50:.3f} | {q99:.3f} | {top:.3f} | "
                     + " | ".join(f"{s.min():.3f} / {np.quantile(s, 0.05):.3f}" for s in copies.values()) + " |")
        print(lines[-1], flush=True)
        b1, b50 = np.quantile(nearest_bits, [0.01, 0.5])
        bits.append(f"| {name} | {nearest_bits.min()} | {b1:.0f} | {b50:.0f} | {close_pairs} | "
                    + " | ".join(f"{d.max()}" for d in copy_bits.values()) + " |")
        print(bits[-1], flush=True)
    lines += ["", f"Hamming distance of the 255-bit perceptual hashes (a pair within {HASH_DISTANCE} bits is "
              "a duplicate): each photo's nearest distinct photo of its class (min, 1% and median over all "
              "photos), the number of distinct pairs of any classes within the distance, and the largest "
              "distance of the same copies to their original:", "",
              "| data set | distinct: min | 1% | median | distinct pairs joined | "
              + " | ".join(f"{k}: max" for k in COPIES) + " |",
              "|---|---|---|---|---|" + "---|" * len(COPIES)] + bits
    lines += ["", "### Injected faults", "",
              "5% of labels flipped at random, 3% of photos duplicated (a quarter each: JPEG quality 75, "
              "JPEG quality 50, resized to 75%, resized to 50%), 5 flowers5 photos added under random "
              "labels; the seed draws the faults and the folds. *Recall @ P≥0.5*: the highest recall of the "
              "flipped labels among the top-k suspects over all k whose precision is at least 0.5 (suspects "
              "flagged in brackets). `audit`: the head's out-of-fold probabilities and the neighbours' vote; "
              "head alone: the same rule on the head's probabilities (the audit before the vote); cleanlab: "
              "`find_label_issues` on the head's probabilities.", "",
              "| data set | seed | images | out-of-fold accuracy | recall @ P≥0.5: `audit` | head alone | cleanlab "
              f"| duplicates grouped (feature threshold; or hash within {HASH_DISTANCE} bits) "
              "| other duplicate groups | flowers flagged (of 5) "
              "| outliers (flowers ranked first; scores) | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rules = r["rules"]
        cleanlab = rules.get(CLEANLAB_RULE)
        by_kind = ", ".join(f"{k}: {v:.2f}" for k, v in r["grouped_by_kind"].items())
        lines.append(f"| {r['name']} | {r['seed']} | {r['images']} | {r['accuracy']:.3f} | "
                     f"**{r['recall']:.2f}** ({r['flagged']}) | "
                     f"{rules[HEAD_RULE]['recall']:.2f} ({rules[HEAD_RULE]['flagged']}) | "
                     + ("– | " if cleanlab is None else f"{cleanlab['recall']:.2f} ({cleanlab['flagged']}) | ")
                     + f"**{r['grouped']:.2f}** of {r['duplicates']} ({by_kind}; "
                     f"auto threshold {r['threshold']:.3f}) | "
                     f"{r['other_groups']} | {r['outsiders_flagged']} | {r['outliers']} "
                     f"({'yes' if r['outsiders_first'] else 'no'}; flowers ≥ {r['lowest_outsider_score']:.2f}, "
                     + (f"others ≤ {r['top_other_score']:.2f}) | " if r["outliers"] > r["outsiders_flagged"]
                        else "no others) | ")
                     + f"{r['seconds']:.0f} |")
    lines += ["", "### Label-issue rules on the same probabilities", "",
              "Recall @ P≥0.5 (suspects flagged) of each rule of `sktransfer._audit.find_label_issues` "
              "(which images are suspects, how they are ranked) on the runs above; `audit` uses "
              f"`{AUDIT_RULE}`, and also judges each duplicate group whose photos carry different labels "
              "as one (its copies labelled otherwise than the group's most probable class are suspects, "
              "first), which this table, from the saved probabilities alone, does not: where a flip hit "
              "one photo of a pair the `audit` column above differs. Other seeds and heads: "
              "`--seeds 5 6 7 8 9 --save-proba runs.npz`, then "
              "`--compare-rules runs.npz` (docs/audit.md).", "",
              table]
    write_section("audit", "\n".join(lines))


if __name__ == "__main__":
    main()
