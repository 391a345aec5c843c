"""Grid search at the cost of one backbone pass.

Times, in one run and from empty caches: one ``fit`` of PretrainedImageClassifier;
a GridSearchCV over 12 head settings with cv=3 (n_jobs=1, and n_jobs=2 with a
shared ``cache_dir``); one fit and the n_jobs=1 search again as whole jobs,
each in a fresh process timed from its start (imports and model set-up
included, as a user waits for them); and the usual skorch way of doing the same search
(NeuralNetClassifier over an image Dataset with the backbone inside the module,
frozen by skorch's Freezer), which runs the backbone in every epoch of every fit.
The peer is slow, so only ``--peer-candidates`` of its 12 candidates are timed
(3 folds each) and its full search time is extrapolated from them (said so in
the table).

    python benchmarks/search.py [--data ../shared/datasets/flowers5] [--n 300] [--backbone NAME] [--write [--section SUFFIX]]

``--backbone`` other than the default runs with random weights (other
weights need a download): the timings are the same, the accuracies are not
meaningful.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import DATASETS, Passes, Timer, add_section_option, machine, run_script, stratified_subset, write_figures
from sklearn.model_selection import GridSearchCV, ParameterGrid, StratifiedKFold, train_test_split

from sktransfer import PretrainedImageClassifier, clear_cache
from sktransfer._backbones import build_backbone

# A linear head at six L2 strengths (L-BFGS, a regularisation path as LogisticRegressionCV's Cs) and an
# MLP head at the same six weight decays (AdamW, decoupled).
GRID = {"hidden_units": [(), (256,)], "weight_decay": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]}

# One fit, or the search, as a whole job: a fresh process, timed from its start.
JOB = r'''
import json, sys, time
start = time.perf_counter()
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sktransfer import PretrainedImageClassifier
X, y, backbone, weights, grid = json.load(open(sys.argv[1]))
model = PretrainedImageClassifier(backbone, weights=weights, random_state=0)
if sys.argv[2] == "search":
    grid = {k: [tuple(v) if isinstance(v, list) else v for v in values] for k, values in grid.items()}
    GridSearchCV(model, grid, cv=StratifiedKFold(3, shuffle=True, random_state=0)).fit(X, y)
else:
    model.fit(X, y)
print(json.dumps({"seconds": time.perf_counter() - start}))
'''


def skorch_peer(backbone, max_epochs, hidden_units, weight_decay, lr=3e-3):
    """The usual skorch pattern: backbone inside the module, frozen with Freezer."""
    from skorch import NeuralNetClassifier
    from skorch.callbacks import Freezer
    from torchvision import transforms as T
    from PIL import Image

    prep = backbone.preprocessing
    transform = T.Compose([
        T.Resize(prep.resize_size, interpolation=T.InterpolationMode(prep.interpolation)),
        T.CenterCrop(prep.crop_size), T.ToTensor(), T.Normalize(prep.mean, prep.std),
    ])

    class Images(torch.utils.data.Dataset):
        def __init__(self, X, y=None):
            self.X, self.y = list(X), y

        def __len__(self):
            return len(self.X)

        def __getitem__(self, i):
            x = transform(Image.open(self.X[i]).convert("RGB"))
            return x, (self.y[i] if self.y is not None else 0)

    class Net(torch.nn.Module):
        def __init__(self, n_classes):
            super().__init__()
            self.backbone = copy.deepcopy(backbone.module).requires_grad_(True)
            layers, width = [], backbone.num_features
            for units in hidden_units:
                layers += [torch.nn.Linear(width, units), torch.nn.ReLU()]
                width = units
            self.head = torch.nn.Sequential(*layers, torch.nn.Linear(width, n_classes))

        def forward(self, x):
            return self.head(self.backbone(x))

    return NeuralNetClassifier(
        Net, module__n_classes=5, criterion=torch.nn.CrossEntropyLoss, optimizer=torch.optim.AdamW,
        lr=lr, optimizer__weight_decay=weight_decay, max_epochs=max_epochs, batch_size=32,
        dataset=Images, train_split=None, callbacks=[Freezer("backbone.*")], verbose=0,
        iterator_train__shuffle=True,
    )


def _table(args, X, Xtr, rows, search, best_acc, fresh_acc):
    table = [
        f"Search over {len(ParameterGrid(GRID))} head settings ({GRID}), cv=3, on {len(Xtr)} training photos "
        f"of `{args.data.split('shared/')[-1]}` (seeded stratified subset of {len(X)}), backbone "
        f"{args.backbone}{'' if args.backbone == 'efficientnet_lite0' else ' (random weights)'}; {machine()}. "
        "Ratios are to one `fit` with default settings in the same run (the two whole-job rows: the second "
        "to the first); all from empty feature caches.",
        "",
        "| what | seconds | × one fit | backbone passes over the training set | fits |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, sec, ratio, passes, fits in rows:
        table.append(f"| {name} | {sec:.1f} | {ratio:.2f} | {'' if np.isnan(passes) else f'{passes:.1f}'} | {fits} |")
    table += [
        "",
        f"Best candidate {search.best_params_}: held-out accuracy {best_acc:.3f} from the search's refit, "
        f"{fresh_acc:.3f} from a fresh fit with the same settings (equal: {best_acc == fresh_acc}).",
    ]
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATASETS / "flowers5"))
    parser.add_argument("--n", type=int, default=300, help="photos (80%% train, 20%% test)")
    parser.add_argument("--peer-candidates", type=int, default=1)
    parser.add_argument("--peer-epochs", type=int, default=10)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    add_section_option(parser)
    args = parser.parse_args()
    weights = "DEFAULT" if args.backbone == "efficientnet_lite0" else None
    model = dict(backbone=args.backbone, weights=weights, random_state=0)

    # Absolute paths: the whole-job rows run in fresh processes started in benchmarks/.
    args.data = str(Path(args.data).resolve())
    X, y = stratified_subset(args.data, args.n)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)
    counter = Passes()
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    base = PretrainedImageClassifier(**model)
    rows = []

    clear_cache()
    with Timer() as fit:
        base.fit(Xtr, ytr)
    passes_fit = counter.images / len(Xtr)
    rows.append(("one fit (default settings)", fit.seconds, 1.0, passes_fit, 1))

    clear_cache()
    counter.images = 0
    with Timer() as search_t:
        search = GridSearchCV(base, GRID, cv=cv, n_jobs=1).fit(Xtr, ytr)
    n_fits = len(ParameterGrid(GRID)) * cv.get_n_splits() + 1
    rows.append((f"GridSearchCV, {len(ParameterGrid(GRID))} candidates x 3 folds + refit, n_jobs=1",
                 search_t.seconds, search_t.seconds / fit.seconds, counter.images / len(Xtr), n_fits))
    fresh = PretrainedImageClassifier(**model).set_params(**search.best_params_).fit(Xtr, ytr)
    best_acc, fresh_acc = search.score(Xte, yte), fresh.score(Xte, yte)

    clear_cache()
    with tempfile.TemporaryDirectory() as cache, Timer() as par:
        GridSearchCV(PretrainedImageClassifier(**model, cache_dir=cache), GRID, cv=cv, n_jobs=2).fit(Xtr, ytr)
    rows.append(("same search, n_jobs=2, shared cache_dir (workers' passes not counted)",
                 par.seconds, par.seconds / fit.seconds, float("nan"), n_fits))

    with tempfile.TemporaryDirectory() as folder:
        job = f"{folder}/job.json"
        with open(job, "w") as f:
            json.dump([list(Xtr), [str(v) for v in ytr], args.backbone, weights, GRID], f)
        fit_job = run_script(JOB, job, "fit")["seconds"]
        search_job = run_script(JOB, job, "search")["seconds"]
    rows.append(("one fit as a whole job (fresh process: imports and model set-up included)",
                 fit_job, 1.0, float("nan"), 1))
    rows.append(("the n_jobs=1 search as a whole job, × that fit", search_job, search_job / fit_job, float("nan"), n_fits))

    if args.peer_candidates > 0:
        backbone = build_backbone(args.backbone, weights)
        candidates = list(ParameterGrid(GRID))[: args.peer_candidates]
        with Timer() as peer:
            for params in candidates:
                for train, _ in cv.split(Xtr, ytr):
                    net = skorch_peer(backbone, args.peer_epochs, **params)
                    ytr_enc = np.searchsorted(np.unique(ytr), ytr[train])
                    net.fit([Xtr[i] for i in train], ytr_enc)
        per_fit = peer.seconds / (len(candidates) * cv.get_n_splits())
        # Each of its fits runs the backbone in every epoch over 2/3 of the training
        # set, and once more over the other 1/3 to score; the refit over all of it.
        n_candidates = len(ParameterGrid(GRID))
        peer_passes = n_candidates * 3 * (args.peer_epochs * 2 / 3 + 1 / 3) + args.peer_epochs
        rows.append((f"usual skorch way (Freezer, {args.peer_epochs} epochs): {len(candidates) * 3} fits timed, "
                     f"{n_fits} extrapolated", per_fit * n_fits, per_fit * n_fits / fit.seconds, peer_passes, n_fits))

    table = _table(args, X, Xtr, rows, search, best_acc, fresh_acc)
    print("\n".join(table))
    if args.write:
        if args.backbone == "efficientnet_lite0":
            write_figures("search", "## Grid search", "\n".join(table), args.section)
        else:
            write_figures(f"search-{args.backbone}", f"### Grid search with {args.backbone}", "\n".join(table),
                          args.section)


if __name__ == "__main__":
    main()
