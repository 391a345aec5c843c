"""The ``sktransfer`` command line."""

from __future__ import annotations

import argparse
import functools
import io
import numbers
import os
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from ._cache import check_cache_dir
from ._choices import CLASSIFIER_MAX_EPOCHS, ENGINES, PRECISIONS
from ._outputs import csv_text, is_stream, make_folders, relative_href, safe_text, write_atomic
from ._version import __version__

SAMPLE = Path(__file__).resolve().parent / "data" / "trash_sample"


def _demo(args):
    import numpy as np
    from sklearn.metrics import confusion_matrix
    from sklearn.model_selection import StratifiedKFold, cross_validate

    from . import PretrainedImageClassifier, load_image_folder

    to_folder = _model_output(args.output)
    X, y = load_image_folder(SAMPLE)
    classes = sorted(set(y))
    print(f"Bundled sample: {len(X)} camera photos of household waste (TrashNet), "
          f"{len(classes)} classes: {', '.join(classes)}")
    clf = PretrainedImageClassifier(random_state=0)
    head = f"MLP head {clf.hidden_units}" if clf.hidden_units else "linear head"
    print(f"Model: PretrainedImageClassifier() - frozen {clf.backbone} backbone, {head}")
    start = time.perf_counter()
    cv = cross_validate(clf, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                        return_estimator=True, return_indices=True)
    seconds = time.perf_counter() - start
    scores = cv["test_score"]
    print(f"\n5-fold cross-validated accuracy: {scores.mean():.3f} ± {scores.std():.3f} "
          f"(folds {' '.join(f'{s:.2f}' for s in scores)})")
    print(f"{len(X)} photos through the backbone and 5 heads trained in {seconds:.1f} s "
          f"({len(X) / seconds:.1f} images/s)")
    predicted = np.empty(len(X), dtype=object)
    for model, test in zip(cv["estimator"], cv["indices"]["test"]):
        predicted[test] = model.predict([X[i] for i in test])  # features are cached: no backbone pass
    print("\n" + _text_confusion_matrix(confusion_matrix(y, predicted.astype(str), labels=classes), classes))

    clf.fit(X, y)
    _save_model(clf, args.output, to_folder)
    loaded = _load_model(args.output)
    same = np.array_equal(loaded.predict_proba(X), clf.predict_proba(X))
    print(f"\nModel trained on all {len(X)} photos saved to {Path(args.output).resolve()} "
          f"(reloaded: predictions identical = {same})")
    print("\nNext, on your own photos (one sub-folder of images per class):\n"
          "  sktransfer fit path/to/photos -o model/\n"
          "  sktransfer predict model/ path/to/new/photos")
    return 0 if same else 1


def _text_confusion_matrix(matrix, classes):
    """A confusion matrix as text: true classes down, predicted across, the diagonal marked."""
    width = max(5, *(len(str(c)) for c in classes))
    head = " " * (width + 2) + " ".join(f"{str(c)[:width]:>{width}}" for c in classes)
    rows = ["Confusion matrix (rows: true class, columns: predicted; [n] = right)", head]
    for i, c in enumerate(classes):
        cells = [f"[{n}]" if i == j else f"{n}" if n else "." for j, n in enumerate(matrix[i])]
        rows.append(f"{str(c):>{width}}  " + " ".join(f"{cell:>{width}}" for cell in cells))
    return "\n".join(rows)


# --------------------------------------------------------------------------
# Helpers shared by the commands

def _progress():
    """Progress bars only for a person watching a terminal, never in logs or pipes."""
    return sys.stderr.isatty()


def _read_dataset(source, path_column="path", label_column="label", lines=None):
    """Paths and labels from a folder with one sub-folder per class, or a CSV file.

    Relative paths in a CSV file are taken relative to the CSV file's folder,
    so a data set folder with its CSV can be moved as a whole. For a CSV file,
    ``lines`` (a dict) gets each path's place, ``"labels.csv line 5"``, for
    messages; a folder's paths are their own place.
    """
    import csv

    import numpy as np

    from . import load_image_folder

    source = Path(source)
    if source.is_dir():
        return load_image_folder(source)
    if not (source.is_file() and source.suffix.lower() == ".csv"):
        raise ValueError(
            f"{str(source)!r} {'is neither a folder nor a .csv file' if source.exists() else 'does not exist'}; "
            "expected a folder with one sub-folder of images per class, or a CSV file with columns "
            f"{path_column},{label_column}."
        )
    with open(source, newline="", encoding="utf-8-sig") as f:
        # Separated as its header names the two columns: by commas, or by the semicolons or
        # tabs of spreadsheets in many locales.
        header = f.readline().rstrip("\r\n")
        f.seek(0)
        delimiter = next((d for d in ",;\t" if {path_column, label_column} <= set(next(csv.reader([header],
                                                                                      delimiter=d), []))), ",")
        if delimiter == "," and header.count(";") > header.count(","):
            delimiter = ";"  # so a refusal below lists its columns as they are named
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in (path_column, label_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{str(source)!r} has no column(s) {', '.join(map(repr, missing))}; its columns are "
                f"{reader.fieldnames}. Name them {path_column},{label_column} or pass "
                "--path-column/--label-column."
            )
        rows = list(reader)
    empty = [n for n, row in enumerate(rows, start=2) if not (row[path_column] or "").strip()
             or not (row[label_column] or "").strip()]
    if empty:
        raise ValueError(
            f"{str(source)!r}: line(s) {empty[:20]}{f' and {len(empty) - 20} more' if len(empty) > 20 else ''} "
            f"have an empty {path_column} or {label_column}; every row needs both."
        )
    if not rows:
        raise ValueError(f"{str(source)!r} has no rows; expected one row per image.")
    paths = [str(source.parent / row[path_column].strip()) for row in rows]
    if lines is not None:
        for n, path in enumerate(paths, start=2):
            lines.setdefault(path, f"{safe_text(source.name)} line {n}")
    return paths, np.asarray([row[label_column].strip() for row in rows])


def _expand_inputs(inputs):
    """Files as given; each folder replaced by the image files under it, sorted by path
    (other files and broken links in it are skipped with a warning)."""
    from ._inputs import IMAGE_EXTENSIONS, image_files, skipped_count, skipped_text

    paths = []
    for given in inputs:
        folder = Path(given)
        if not folder.is_dir():
            if str(given).endswith(("/", os.sep)):
                raise ValueError(f"folder {given!r} not found.")
            paths.append(given)  # missing or unreadable files are reported with every other bad input
            continue
        skipped, broken = [], []
        found = image_files(folder, skipped, broken)
        if skipped or broken:
            warnings.warn(f"skipped {skipped_count(skipped, broken)} in {given!r}: "
                          f"{skipped_text(skipped, broken)}.", UserWarning, stacklevel=2)
        if not found:
            raise ValueError(
                f"{given!r} is a folder with no image files (looked for {', '.join(IMAGE_EXTENSIONS)})."
            )
        paths.extend(found)
    return paths


def _parse_value(text):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as resnet18 or balanced


def _split_top_level(text):
    """Split at commas outside brackets and quotes: '(),(256,)' -> ['()', '(256,)']."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _parse_grid(specs, estimator):
    """``["lr=1e-3,1e-2", "hidden_units=(),(256,)"]`` -> a GridSearchCV param grid."""
    from ._head import HEAD_PREFIXES

    grid = {}
    known = sorted(estimator.get_params(deep=False))
    for spec in specs or []:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(f"--grid {spec!r} is not KEY=V1,V2,...; e.g. --grid dropout=0.0,0.5")
        if key not in known and not key.startswith(HEAD_PREFIXES):
            raise ValueError(
                f"--grid {spec!r}: {key!r} is not a setting of PretrainedImageClassifier; "
                f"use one of {', '.join(known)} or a skorch setting such as optimizer__betas."
            )
        tokens = _split_top_level(values)
        if any(t == "" for t in tokens):
            raise ValueError(f"--grid {spec!r} has an empty value; separate values with single commas.")
        grid[key] = [_parse_value(t) for t in tokens]
    return grid


#: The classifier's parameters that options set: {parameter: option}.
_OPTIONS = {"backbone": "--backbone", "weights": "--weights", "cache_dir": "--cache-dir", "device": "--device",
            "random_state": "--random-state", "engine": "--engine", "precision": "--precision",
            "max_epochs": "--max-epochs"}


def _validated(clf, args):
    """``clf`` with its parameters checked; a refusal names the option that gave the setting."""
    try:
        clf._validate_params()
    except ValueError as e:
        # scikit-learn's message names the parameter ("The 'random_state' parameter of ...").
        given = [f"{flag} {getattr(args, name)}" for name, flag in _OPTIONS.items()
                 if f"'{name}'" in str(e) and hasattr(args, name)]
        raise ValueError(f"{given[0]}: {e}" if given else str(e)) from None
    check_cache_dir(clf.cache_dir)  # before any --grid candidate is checked: it is none of theirs
    return clf


def _check_settings(clf, grid, y, folds, where):
    """Refuse, before any image is read, the settings the classifier's own checks
    refuse for the labels ``y`` or for a training fold of them (``folds``, index
    arrays, named ``where`` in messages): every ``--grid`` candidate's (``clf``'s
    own are checked by :func:`_validated`).

    Returns the grid's keys that the full-batch linear head of some candidate
    does not read (lr, batch_size: its :func:`unread_settings`),
    to be said once instead of once per fit.
    """
    from sklearn.base import clone
    from sklearn.model_selection import ParameterGrid

    from ._head import full_batch, unread_settings

    defaults = type(clf)().get_params(deep=False)
    unread = []
    for candidate in ParameterGrid(grid):
        estimator = clone(clf).set_params(**candidate)
        try:
            _, _, params, extra = estimator._check_fit_settings(y, folds, where)
        except ValueError as e:
            given = ", ".join(f"{k}={v!r}" for k, v in candidate.items())
            raise ValueError(f"--grid candidate {given}: {e}" if candidate else str(e)) from None
        if full_batch(params, extra, False):
            ignored = unread_settings(params, defaults, extra)
            unread += [k for k in candidate if k in ignored and k not in unread]
    return unread


def _check_output(path, option, folder=False):
    """Fail before any long work when ``path`` cannot be written: a file output
    that is a folder, a folder output that is a file, or a missing parent that
    cannot be made (a file in the way, or a folder the user cannot write in,
    or where no file can be made). An existing stream (``/dev/stdout``, a
    FIFO) needs only to be writable.

    Missing parent folders are made when the output is written (:func:`_write`).
    """
    shown = safe_text(path)
    if not folder and os.fspath(path).endswith(("/", os.sep)):
        raise ValueError(f"{option} {shown!r} ends in '/', a folder; give a file name.")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {shown!r} is a file, not a folder; give a folder for the output.")
    if not folder and os.path.isdir(path):
        raise ValueError(f"{option} {shown!r} is a folder; give a file name.")
    if not folder and is_stream(path):
        # /dev/stdout, a FIFO: written into, as a shell's `>` does (write_atomic), not
        # through a file made in its folder (/dev/stdout's is /proc/<pid>/fd).
        if not os.access(path, os.W_OK):
            raise ValueError(f"{option} {shown!r}: no permission to write to it.")
        return
    # An output named by a link is written where the link points (write_atomic).
    existing = Path(os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path))
    if not folder:
        existing = existing.parent
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {shown!r}: {safe_text(existing)!r} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {shown!r}: no permission to write in {safe_text(existing)!r}.")
    # The permission bits let root write anywhere, but a read-only mount (or /proc)
    # takes no file: make one, unnamed where the system allows, and let it go.
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise ValueError(f"{option} {shown!r}: no file can be made in {safe_text(existing)!r} "
                         f"({e.strerror or type(e).__name__}).") from None


def _model_output(path):
    """Whether the model output ``-o path`` is a save_model folder (True) or a joblib file (False).

    A path ending in ``/`` or an existing folder is a folder: empty, or one a
    save_model wrote (its files are replaced, as save_model does), never a
    folder of other files. A file's name must say it is a pickle (one of
    :data:`PICKLE_SUFFIXES`), as :func:`_load_model` asks of the files it
    loads: ``-o model`` could mean either. Refused at once, before any long work.
    """
    from ._export import check_model_folder

    shown = safe_text(path)
    folder = path.endswith(("/", os.sep)) or os.path.isdir(path)
    if not folder and not _named_as_pickle(path):
        name = shown.rstrip(".") if not Path(path).suffix else shown[:-len(Path(path).suffix)]
        raise ValueError(
            f"-o {shown!r} is neither a folder nor a file named .joblib, .pkl or .pickle: write -o {name}/ for "
            f"the save_model folder (safe to share) or -o {name}.joblib for a joblib file (runs code when "
            "loaded: trusted sources only)."
        )
    if folder:
        try:
            check_model_folder(path)
        except ValueError as e:
            raise ValueError(f"-o {e}") from None
    _check_output(path, "-o", folder=folder)
    return folder


def _check_folder_can_hold(grid, path):
    """Refuse at once a save_model folder ``path`` for a fit that may fine-tune
    backbone blocks (a ``grid`` candidate with ``unfreeze`` above 0): save_model
    refuses such a model, and which candidate wins is known only after all the work."""
    tuned = [v for v in grid.get("unfreeze", []) if isinstance(v, numbers.Integral) and v > 0]
    if tuned:
        shown = safe_text(path)
        raise ValueError(
            f"-o {shown!r} is a save_model folder, which cannot hold a model fine-tuned with "
            f"unfreeze={tuned[0]} (its trained backbone blocks are code as well as tensors); write "
            f"-o {shown.rstrip('/' + os.sep) + '.joblib'!r} (a joblib file: trusted sources only), or leave "
            "unfreeze out of --grid."
        )


def _save_model(model, path, folder):
    """``model`` as a save_model folder (tensors and JSON: safe to share) or a joblib file."""
    if folder:
        from ._export import save_model

        with _writing(path):
            save_model(model, path)
    else:
        _dump(model, path)


@contextmanager
def _writing(path):
    """An error while writing ``path`` names ``path``, never a temporary file beside it."""
    try:
        yield
    except OSError as e:
        raise OSError(f"cannot write {safe_text(path)!r}: {e.strerror or e}") from None


def _write(path, data):
    """``data`` (bytes) to the file ``path``, whole or not at all; missing parent folders are made."""
    with _writing(path):
        write_atomic(path, data, makedirs=True)


def _dump(model, path):
    """``joblib.dump(model, path)``, replacing ``path`` whole or not at all."""
    import joblib

    data = io.BytesIO()
    joblib.dump(model, data)
    _write(path, data.getvalue())


#: The names of model files the command line unpickles (and writes): a pickle runs code
#: when loaded, so only a file whose name says it is one is loaded as one.
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")


def _named_as_pickle(path):
    # model.joblib, and joblib's compressed model.joblib.gz and the like
    return any(suffix.lower() in PICKLE_SUFFIXES for suffix in Path(path).suffixes[-2:])


def _load_model(path, classifier=True):
    """A fitted classifier (any fitted model with ``classifier=False``) from a save_model
    folder or a joblib file, with a plain error for anything else."""
    import pickle

    import joblib
    from sklearn.utils.validation import check_is_fitted

    if Path(path).is_dir():
        from ._export import load_model

        model = load_model(path)  # tensors and JSON: no code runs
    elif not Path(path).is_file():
        raise ValueError(f"model {str(path)!r} does not exist (save one with `sktransfer fit -o`).")
    elif not _named_as_pickle(path):
        # A file put in place of a shared save_model folder, or any other file given
        # as the model (a CSV, the arguments swapped), is never unpickled.
        raise ValueError(
            f"{str(path)!r} is neither a save_model folder nor a joblib file: a model is a folder written by "
            f"`sktransfer fit -o model/` or save_model, or a file named .joblib, .pkl or .pickle (which runs "
            "code when loaded: trusted sources only)."
        )
    else:
        try:
            model = joblib.load(path)
        # Text read as pickle opcodes fails with any of these (a CSV's 'p' reads as an int).
        except (pickle.UnpicklingError, EOFError, KeyError, IndexError, AttributeError, ValueError,
                ModuleNotFoundError) as e:
            needs = f": it needs the module {e.name!r}, not installed here" if isinstance(e, ModuleNotFoundError) else ""
            raise ValueError(f"{str(path)!r} is not a model saved by sktransfer fit or joblib.dump{needs}.") from None
    if hasattr(model, "get_params") and not _takes_images(model):
        raise ValueError(
            f"{str(path)!r} holds a {type(model).__name__}, which takes features, not image paths; the model "
            "must be one of sktransfer's (as `sktransfer fit` saves) or a Pipeline starting with ImageEmbedder."
        )
    if classifier and not (hasattr(model, "predict_proba") and hasattr(model, "classes_")):
        raise ValueError(
            f"{str(path)!r} holds a {type(model).__name__}, not a fitted classifier with predict_proba."
        )
    check_is_fitted(model)
    return model


def _takes_images(model):
    """Whether ``model`` is, or holds (a Pipeline's step, a meta-estimator's estimator), a sktransfer estimator."""
    from ._estimator import ImageEmbedder, _PretrainedImageModel

    parts = [model, *model.get_params(deep=True).values()]
    return any(isinstance(p, (ImageEmbedder, _PretrainedImageModel)) for p in parts)


def _show_embedding_progress(model, on):
    embedder = getattr(model, "embedder_", None)
    if embedder is not None:
        embedder.verbose = int(on)


def _write_table(header, rows, output):
    """CSV to ``output`` (written whole, or not at all), or to stdout when it is None.

    Cells that a spreadsheet would run as a formula are neutralised (:func:`csv_cell`).
    """
    if output is None:
        sys.stdout.write(csv_text([header, *rows], lineterminator="\n"))
        return
    _write(output, csv_text([header, *rows]).encode("utf-8"))


# --------------------------------------------------------------------------
# Commands

_SHOWN_SETTINGS = ("backbone", "hidden_units", "dropout", "lr", "weight_decay", "max_epochs",
                   "batch_size", "class_weight", "early_stopping")


def _fit(args):
    import numpy as np
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV, ParameterGrid, StratifiedKFold

    from . import PretrainedImageClassifier
    from ._inputs import _count

    if args.cv < 2:
        raise ValueError(f"--cv {args.cv}: cross-validation needs at least 2 folds.")
    to_folder = _model_output(args.output)
    clf = PretrainedImageClassifier(
        backbone=args.backbone, weights=args.weights, cache_dir=args.cache_dir,
        device=args.device, random_state=args.random_state,
        engine=args.engine, precision=args.precision,
    )
    if args.max_epochs is not None:
        clf.set_params(max_epochs=args.max_epochs)
    _validated(clf, args)
    grid = _parse_grid(args.grid, clf)
    if to_folder:
        _check_folder_can_hold(grid, args.output)
    X, y = _read_dataset(args.data, args.path_column, args.label_column, args.lines)
    classes, counts = np.unique(y, return_counts=True)
    print(f"{_count(X, 'image')}, {len(classes)} {'class' if len(classes) == 1 else 'classes'}: "
          + ", ".join(f"{c} ({n})" for c, n in zip(classes, counts)))
    if counts.min() < args.cv:
        raise ValueError(
            f"class {classes.tolist()[counts.argmin()]!r} has {counts.min()} images, fewer than --cv {args.cv} "
            "folds; add images or lower --cv."
        )
    splitter = StratifiedKFold(args.cv, shuffle=True, random_state=args.random_state)
    unread = _check_settings(clf, grid, y, [train for train, _ in splitter.split(X, y)], f"--cv {args.cv}")
    if unread:
        them = "it" if len(unread) == 1 else "them"
        print(f"note: {' and '.join(unread)} {'is' if len(unread) == 1 else 'are'} not used by the default "
              f"linear head, fitted full batch by L-BFGS: candidates that differ only in {them} give the same "
              f"model. Heads AdamW trains read {them}: with --grid hidden_units=(256,) or dropout=0.5.")
    # Each image goes through each backbone once, here: bad images are reported
    # before any training, and every fit below reads its features from the cache.
    feature_keys = {k: v for k, v in grid.items() if k in ("backbone", "weights", "preprocessing")}
    for params in ParameterGrid(feature_keys):
        embedder = clone(clf).set_params(**params)._make_embedder()
        embedder.set_params(verbose=int(_progress())).fit().transform(X)

    candidates = len(ParameterGrid(grid))
    bar = None
    if _progress():
        from tqdm.auto import tqdm

        bar = tqdm(total=candidates * args.cv, desc="cross-validation fits", unit="fit")

    def accuracy(estimator, X_test, y_test):
        if bar is not None:
            bar.update(1)
        return float(np.mean(estimator.predict(X_test) == np.asarray(y_test)))

    search = GridSearchCV(
        clf, grid, scoring=accuracy, error_score="raise",
        cv=splitter,
    )
    with warnings.catch_warnings():
        if unread:  # said once above, not once per fit
            warnings.filterwarnings("ignore", r".* not used by this fit: the linear head", UserWarning)
        search.fit(X, y)
    if bar is not None:
        bar.close()
    results = search.cv_results_
    best = search.best_index_
    chosen = (f" (the best of {candidates} candidates, chosen on these folds: optimistic; `sktransfer evaluate` "
              "on photos kept out of DATA measures the chosen model)") if candidates > 1 else ""
    print(f"{args.cv}-fold cross-validated accuracy: {results['mean_test_score'][best]:.3f} "
          f"± {results['std_test_score'][best]:.3f}{chosen}")
    if candidates > 1:
        print(f"Grid of {candidates} candidates, best first:")
        for i in np.argsort(results["rank_test_score"], kind="stable"):
            print(f"  {results['mean_test_score'][i]:.3f} ± {results['std_test_score'][i]:.3f}  "
                  + ", ".join(f"{k}={v!r}" for k, v in results["params"][i].items()))
    model = search.best_estimator_
    params = model.get_params(deep=False)
    shown = [k for k in _SHOWN_SETTINGS if k not in grid] + list(grid)
    print("Chosen settings: " + ", ".join(f"{k}={params[k]!r}" for k in shown))
    _save_model(model, args.output, to_folder)
    print(f"Model trained on all {_count(X, 'image')} saved to {safe_text(args.output)}")
    return 0


def _predict(args):
    import numpy as np

    if args.output is not None:
        _check_output(args.output, "-o")
    model = _load_model(args.model, classifier=False)
    if not hasattr(model, "predict"):
        raise ValueError(f"{str(args.model)!r} holds a {type(model).__name__}, which does not predict (it has "
                         "no predict method).")
    classifier = hasattr(model, "predict_proba") and hasattr(model, "classes_")
    if args.proba and not classifier:
        raise ValueError(f"--proba needs a classifier; {str(args.model)!r} holds a {type(model).__name__}, "
                         "which predicts numbers.")
    paths = _expand_inputs(args.inputs)
    _show_embedding_progress(model, _progress())
    if not classifier:
        values = np.asarray(model.predict(paths), dtype=float)
        header = ["path", "prediction"] if values.ndim == 1 else [
            "path", *(f"prediction_{i}" for i in range(values.shape[1]))]
        rows = [[path, *(format(v, ".9g") for v in np.atleast_1d(row))] for path, row in zip(paths, values)]
        return _write_predictions(header, rows, args.output)
    proba = np.asarray(model.predict_proba(paths))
    classes = np.asarray(model.classes_)
    if getattr(model, "multilabel_", False):  # a 0/1 indicator row: name the labels that apply
        predicted = [" ".join(str(c) for c, on in zip(classes, row) if on) for row in proba > 0.5]
    else:
        predicted = classes[proba.argmax(axis=1)]
    header = ["path", "prediction"]
    if args.proba:
        header += [f"proba_{c}" for c in classes]
    rows = [[path, label] + ([f"{p:.6f}" for p in row] if args.proba else [])
            for path, label, row in zip(paths, predicted, proba)]
    return _write_predictions(header, rows, args.output)


def _write_predictions(header, rows, output):
    _write_table(header, rows, output)
    if output is not None:
        from ._inputs import _count

        _told(f"{_count(rows, 'prediction')} written to {safe_text(output)}", output)
    return 0


def _told(text, output):
    """Say ``text`` about the output written to ``output``: on standard output, or on standard
    error when ``output`` is a pipe or device (``-o /dev/stdout``), so the line stays out of the data."""
    regular = not os.path.exists(output) or os.path.isfile(output)
    print(text, file=sys.stdout if regular else sys.stderr)


def _evaluate(args):
    import html
    import json


    try:
        import matplotlib
    except ImportError:
        raise ImportError("sktransfer evaluate draws pictures with matplotlib: "
                          "pip install 'sktransfer[plot]' (or matplotlib).") from None
    matplotlib.use("Agg")  # files only, never a window
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay, classification_report, confusion_matrix

    from ._inputs import _count
    from ._plotting import _figure, plot_top_losses, top_losses

    out = Path(args.output)
    if args.top < 1:
        raise ValueError(f"--top {args.top}: the number of misclassified images shown must be at least 1.")
    _check_output(out, "-o", folder=True)
    model = _load_model(args.model)
    if getattr(model, "multilabel_", False):
        raise ValueError(f"{safe_text(args.model)!r} is a multi-label classifier; evaluate reports models with one "
                         "class per image (score a multi-label model in Python: docs/beyond-classification.md).")
    X, y = _read_dataset(args.data, args.path_column, args.label_column, args.lines)
    _show_embedding_progress(model, _progress())
    classes = np.asarray(model.classes_)
    if classes.dtype.kind in "iu" and y.dtype.kind in "US":  # integer classes, labels read as text
        try:
            y = y.astype(classes.dtype)
        except ValueError:
            pass
    known = set(classes.tolist())
    unknown = sorted({v for v in y.tolist() if v not in known}, key=str)
    if unknown:
        places = []
        for label in unknown:
            mine = [p for p, v in zip(X, y.tolist()) if v == label]
            where = (f" in {safe_text(Path(args.data) / str(label))!r}" if Path(args.data).is_dir() else
                     ": " + ", ".join(args.lines[p] for p in mine[:10]) + (", ..." if len(mine) > 10 else ""))
            places.append(f"{label!r} ({_count(mine, 'image')}{where})")
        raise ValueError(f"{safe_text(args.data)!r} has labels the model does not know: {', '.join(places)}; "
                         f"the model knows {', '.join(map(repr, classes.tolist()))}.")
    losses, predicted, _ = top_losses(model, X, y)
    _show_embedding_progress(model, False)
    accuracy = float(np.mean(predicted == y))
    # The classes in the data or predicted (in the model's order): one the data lacks and the
    # model never predicts has no recall, and would drag the macro averages down as a 0.
    reported = classes[np.isin(classes, np.union1d(y, predicted))]
    report = classification_report(y, predicted, labels=reported, output_dict=True, zero_division=0)
    matrix = confusion_matrix(y, predicted, labels=classes)
    measures = ("precision", "recall", "f1-score")
    metrics = {
        "n_images": len(X),
        "accuracy": accuracy,
        "classes": [str(c) for c in classes],
        "per_class": {str(c): {k: report[str(c)][k] for k in (*measures, "support")} for c in reported},
        "macro_avg": {k: report["macro avg"][k] for k in measures},
        "confusion_matrix": matrix.tolist(),
    }
    # Everything is made in memory first, then each file is replaced whole: a
    # failure leaves no half-written report.
    files = {"metrics.json": json.dumps(metrics, indent=2) + "\n"}
    text = classification_report(y, predicted, labels=reported, zero_division=0, digits=3)
    files["report.txt"] = safe_text(f"accuracy {accuracy:.3f} on {len(X)} images\n\n{text}")

    def png(fig):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()

    # Labels are drawn as they are: '$' in a class name is text, not mathtext.
    with matplotlib.rc_context({"text.parse_math": False}):
        size = max(5.0, 0.6 * len(classes) + 3)
        fig = _figure((size, size))
        ConfusionMatrixDisplay(matrix, display_labels=[safe_text(c) for c in classes]).plot(
            ax=fig.subplots(), xticks_rotation=45 if len(classes) > 5 else "horizontal", colorbar=False)
        fig.tight_layout()
        files["confusion_matrix.png"] = png(fig)
        n_wrong = int(np.sum(predicted != y))
        shown = []
        if n_wrong:
            fig = plot_top_losses(model, X, y, k=args.top, wrong_only=True)
            files["top_losses.png"] = png(fig)
            shown = fig.indices
    wrong = [(X[i], y[i], predicted[i], losses[i]) for i in shown]

    def link(path):  # the image, from the report's folder
        return f'<a href="{relative_href(path, out)}">{html.escape(safe_text(path))}</a>'

    rows = "\n".join(
        f"<tr><td>{html.escape(safe_text(c))}</td><td>{report[str(c)]['precision']:.3f}</td>"
        f"<td>{report[str(c)]['recall']:.3f}</td><td>{report[str(c)]['f1-score']:.3f}</td>"
        f"<td>{int(report[str(c)]['support'])}</td></tr>" for c in reported)
    mistakes = "\n".join(
        f"<tr><td>{link(p)}</td><td>{html.escape(safe_text(t))}</td><td>{html.escape(safe_text(q))}</td>"
        f"<td>{loss:.3f}</td></tr>" for p, t, q, loss in wrong)
    mistakes = ('<img src="top_losses.png" alt="the most confidently wrong images">\n'
                "<table><tr><th>image</th><th>true</th><th>predicted</th><th>loss</th></tr>\n"
                f"{mistakes}\n</table>") if wrong else "<p>No image is misclassified.</p>"
    files["index.html"] = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>sktransfer evaluation</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:auto}}td,th{{padding:0 1em;text-align:left}}</style>
</head><body>
<h1>Evaluation of {html.escape(safe_text(Path(args.model).name))}</h1>
<p>Data: {html.escape(safe_text(args.data))}, {len(X)} images. Accuracy <b>{accuracy:.3f}</b>;
{n_wrong} misclassified.</p>
<h2>Per class</h2>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>f1</th><th>images</th></tr>
{rows}
</table>
<h2>Confusion matrix</h2>
<p>Rows: true class; columns: predicted class.</p>
<img src="confusion_matrix.png" alt="confusion matrix">
<h2>Most confidently wrong</h2>
{mistakes}
</body></html>
"""
    for name, data in files.items():
        _write(out / name, data if isinstance(data, bytes) else data.encode("utf-8"))
    if not wrong:  # an earlier report's picture of mistakes would belie this one
        (out / "top_losses.png").unlink(missing_ok=True)
    print(f"accuracy {accuracy:.3f} on {_count(X, 'image')} ({n_wrong} misclassified)")
    print(f"Report written to {safe_text(out / 'index.html')}")
    return 0


def _embed(args):
    import numpy as np

    from . import ImageEmbedder

    output = Path(args.output)
    if output.suffix.lower() not in (".parquet", ".npy"):
        raise ValueError(f"-o {args.output!r}: the file name must end in .parquet or .npy.")
    listing = output.with_suffix(".paths.txt")
    _check_output(output, "-o")
    if output.suffix.lower() == ".npy":
        _check_output(listing, "-o (its list of paths)")
    if output.suffix.lower() == ".parquet":
        try:
            import pandas as pd
            import pyarrow  # noqa: F401
        except ImportError:
            raise ImportError("writing .parquet needs pandas and pyarrow: pip install 'sktransfer[parquet]'; "
                              "or write .npy.") from None
    paths = _expand_inputs(args.inputs)
    names = [safe_text(p) for p in paths]
    if output.suffix.lower() == ".npy":
        # The list of paths has one per line: a name with a line break would shift every later row.
        broken = [n for n in names if "".join(n.splitlines()) != n]
        if broken:
            raise ValueError(
                f"-o {safe_text(output)!r}: {len(broken)} file name(s) contain a line break, and "
                f"{safe_text(listing.name)!r} lists one path per line: {', '.join(map(repr, broken))}. "
                "Write .parquet instead (it keeps the paths in a column), or rename the files.")
    embedder = ImageEmbedder(args.backbone, args.weights, batch_size=args.batch_size, cache_dir=args.cache_dir,
                             device=args.device, verbose=int(_progress()), engine=args.engine,
                             precision=args.precision).fit()
    features = embedder.transform(paths)
    # Made in memory, then each file is replaced whole: no command leaves a
    # partial file, or a features file without its list of paths.
    data = io.BytesIO()
    if output.suffix.lower() == ".npy":
        np.save(data, features)
        # The larger file first: if it cannot be written, the old features keep their old list.
        _write(output, data.getvalue())
        _write(listing, "".join(n + "\n" for n in names).encode("utf-8"))
        _told(f"{features.shape[0]} x {features.shape[1]} features written to {safe_text(output)}; "
              f"row i is the image on line i of {safe_text(listing)}", output)
    else:
        frame = pd.DataFrame(features, columns=embedder.get_feature_names_out())
        frame.insert(0, "path", names)
        frame.to_parquet(data, index=False)
        _write(output, data.getvalue())
        _told(f"{features.shape[0]} images x {features.shape[1]} features written to {safe_text(output)}",
              output)
    return 0


def _export(args):
    import json

    from . import export_onnx, load_model

    output = Path(args.output)
    if output.suffix.lower() != ".onnx":
        raise ValueError(f"{args.output!r}: the file name must end in .onnx.")
    _check_output(output, "OUTPUT")
    model = load_model(args.model) if Path(args.model).is_dir() else _load_model(args.model, classifier=False)
    with _writing(output):
        make_folders(output.parent)
        export_onnx(model, output)
    meta = _onnx_metadata(output)
    crop, resize = json.loads(meta["crop_size"]), json.loads(meta["resize_size"])
    h, w = (crop, crop) if isinstance(crop, int) else crop
    if meta["crop_mode"] == "center" and isinstance(resize, int):
        prepare = f"resize the shorter side to {resize} ({meta['interpolation']}) and crop the centre first"
    else:
        prepare = (f"prepare them as crop_mode={meta['crop_mode']!r} with resize_size={resize} "
                   f"({meta['interpolation']}) says")
    print(f"{type(model).__name__} exported to {output} ({output.stat().st_size / 1e6:.1f} MB): "
          f"uint8 images (n, {h}, {w}, 3) in, {meta['output']} out; {prepare} (docs/deployment.md).")
    return 0


def _onnx_metadata(path):
    import onnx

    return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}


def _backbones(args):
    import torch

    from ._backbones import describe_backbone, list_backbones, weights_offline

    print(f"{'backbone':<28} {'weights offline':<16} {'features':>8} {'params (M)':>11} {'GFLOPs':>8}", flush=True)
    for name in list_backbones():
        if args.offline and not weights_offline(name):
            continue
        r = describe_backbone(name)  # a fraction of a second each: each row is shown as it comes
        print(f"{r['name']:<28} {'yes' if r['weights_offline'] else 'no':<16} "
              f"{r['num_features'] if r['num_features'] else '-':>8} "
              f"{r['num_params'] / 1e6 if r['num_params'] else float('nan'):>11.1f} "
              f"{r['gflops'] if r['gflops'] is not None else '-':>8}", flush=True)
    print(f"\nWeights that are not offline are downloaded on first use into "
          f"{Path(torch.hub.get_dir()) / 'checkpoints'}; any timm model works as timm/<name>.")
    return 0


def _audit(args):
    from . import PretrainedImageClassifier, audit

    out = Path(args.output)
    _check_output(out, "-o", folder=True)
    clf = _validated(PretrainedImageClassifier(
        backbone=args.backbone, weights=args.weights, cache_dir=args.cache_dir, device=args.device,
        random_state=args.random_state, engine=args.engine, precision=args.precision), args)
    X, y = _read_dataset(args.data, args.path_column, args.label_column, args.lines)
    X_test = y_test = None
    if args.test is not None:
        try:
            X_test, y_test = _read_dataset(args.test, args.path_column, args.label_column, args.lines)
        except ValueError as e:
            raise ValueError(f"--test {e}") from None
    try:
        report = audit(clf, X, y, cv=args.cv, X_test=X_test, y_test=y_test,
                       duplicate_threshold=args.threshold, random_state=args.random_state,
                       verbose=int(args.verbose or _progress()))
    except ValueError as e:
        if not str(e).startswith("duplicate_threshold="):
            raise
        raise ValueError(f"--threshold {str(e).partition('=')[2]}") from None
    with _writing(out):
        make_folders(out)
        report.to_csv(out / "findings.csv")
        report.to_html(out / "index.html")
    print(report.summary())
    print(f"Images joined as duplicates from a feature cosine similarity of {report.duplicate_threshold:.3f} "
          "(--threshold).")
    print(f"Report written to {out / 'index.html'} and {out / 'findings.csv'}")
    return 0


def _similarity_threshold(text):
    """``--threshold``: ``auto`` or a number."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither auto nor a number; give a cosine similarity such as 0.95, or auto."
        ) from None


_MODEL_HELP = ("a folder written by `sktransfer fit -o FOLDER/` or save_model (safe to share), or a "
               "joblib file (runs code when loaded: trusted sources only)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="sktransfer",
        description="Transfer learning for images with a frozen pretrained backbone.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo", help="train on the bundled photo sample, save, reload, predict",
        description="Cross-validate the default PretrainedImageClassifier on the 180 bundled TrashNet "
                    "photos (6 classes), print its accuracy and a confusion matrix, then train it on all of "
                    "them and save it. Offline.")
    demo.add_argument("-o", "--output", default="sktransfer-demo.joblib",
                      help="where to save the model: a FOLDER/ (ending in /) for the safe save_model format, "
                           "else a joblib file (default: sktransfer-demo.joblib, in the current folder)")
    demo.set_defaults(run=_demo)

    def data_options(command):
        command.add_argument("--path-column", default="path", help="CSV column of image paths (default: path)")
        command.add_argument("--label-column", default="label", help="CSV column of labels (default: label)")

    def backbone_options(command):
        command.add_argument("--backbone", default="efficientnet_lite0",
                             help="see `sktransfer backbones` (default: efficientnet_lite0)")
        command.add_argument("--weights", default="DEFAULT",
                             help="the backbone's weights: DEFAULT (its pretrained ones), a torchvision "
                                  "weights name, or a state-dict file (.pth), e.g. downloaded on another "
                                  "machine to work offline (default: DEFAULT)")

    def engine_options(command):
        command.add_argument("--engine", choices=ENGINES, default="auto",
                             help="what runs the backbone: OpenVINO where installed, else PyTorch (default: auto)")
        command.add_argument("--precision", choices=PRECISIONS, default="auto",
                             help="auto is float32; bfloat16 is about twice as fast in OpenVINO on CPUs with AMX or "
                                  "AVX-512 BF16, with features less close to float32's (least cosine 0.98 on real photos) (default: auto)")

    data_help = "a folder with one sub-folder of images per class, or a CSV file with path,label columns"
    fit = commands.add_parser(
        "fit", help="train a classifier, print its cross-validated accuracy, save it",
        description="Train a PretrainedImageClassifier, choosing settings by cross-validated grid "
                    "search when --grid is given, then refit on all images and save it (-o).")
    fit.add_argument("data", metavar="DATA", help=data_help)
    fit.add_argument("-o", "--output", default="model.joblib",
                     help="where to save the model: a FOLDER/ (ending in /) for the safe save_model format, "
                          "else a joblib file (default: model.joblib)")
    backbone_options(fit)
    fit.add_argument("--cv", type=int, default=5, help="cross-validation folds (default: 5)")
    fit.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                     help="settings to try, e.g. hidden_units='(),(256,)' or dropout=0.0,0.5 or "
                          "backbone=efficientnet_lite0,efficientnet_lite1 or weight_decay=0.01,0.1,1; "
                          "repeatable. The default linear head (weight_decay=auto) is fitted by L-BFGS at a "
                          "tuned L2 strength (a number: that strength): it reads neither lr nor batch_size")
    fit.add_argument("--max-epochs", type=int, default=None,
                     help="epochs of head training (AdamW's, with --grid hidden_units=... or dropout=...; "
                          "for the linear head, the most L-BFGS steps) (default: the classifier's, "
                          f"{CLASSIFIER_MAX_EPOCHS})")
    fit.add_argument("--cache-dir", help="folder of a disk feature cache, reused by later runs")
    fit.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (default: cpu)")
    fit.add_argument("--random-state", type=int, default=0, help="seed of folds and training (default: 0)")
    engine_options(fit)
    data_options(fit)
    fit.set_defaults(run=_fit)

    predict = commands.add_parser(
        "predict", help="predict the class (or a regressor's numbers) of images; one CSV row per input, "
                        "in input order",
        description="Predict with a saved model. Folders are replaced by the image files under "
                    "them, sorted by path. Writes CSV rows: path, prediction[, proba_<class>...]; for a "
                    "regressor path, prediction (path, prediction_0, prediction_1, ... for several outputs).")
    predict.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    predict.add_argument("inputs", metavar="PATH_OR_DIR", nargs="+", help="image files or folders")
    predict.add_argument("--proba", action="store_true", help="add the probability of each class (classifiers)")
    predict.add_argument("-o", "--output", help="CSV file to write (default: standard output)")
    predict.set_defaults(run=_predict)

    evaluate = commands.add_parser(
        "evaluate", help="accuracy, per-class metrics, confusion matrix and worst mistakes as a report",
        description="Evaluate a saved model on labelled images and write a report folder: "
                    "metrics.json, report.txt, confusion_matrix.png, top_losses.png and index.html.")
    evaluate.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    evaluate.add_argument("data", metavar="DATA", help=data_help)
    evaluate.add_argument("-o", "--output", default="report", help="report folder (default: report)")
    evaluate.add_argument("--top", type=int, default=9, help="misclassified images shown (default: 9)")
    data_options(evaluate)
    evaluate.set_defaults(run=_evaluate)

    embed = commands.add_parser(
        "embed", help="write the feature vectors of images to .parquet or .npy",
        description="Embed images with a frozen backbone. Folders are replaced by the image files "
                    "under them, sorted by path. .parquet gets a path column and one column per "
                    "feature; .npy gets the array, with the paths in <name>.paths.txt, one per line "
                    "(a path with a line break needs .parquet).")
    embed.add_argument("inputs", metavar="PATH_OR_DIR", nargs="+", help="image files or folders")
    embed.add_argument("-o", "--output", required=True, help="features.parquet or features.npy")
    backbone_options(embed)
    embed.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    embed.add_argument("--cache-dir", help="folder of a disk feature cache")
    embed.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    engine_options(embed)
    embed.set_defaults(run=_embed)

    audit = commands.add_parser(
        "audit", help="find suspected label errors, duplicates, train/test leakage and outliers",
        description="Audit labelled images with the out-of-fold predictions of one cross-validation "
                    "and nearest neighbours in feature space. Writes index.html (thumbnails of each "
                    "finding) and findings.csv (path, finding, given_label, suggested_label, score, group, split).")
    audit.add_argument("data", metavar="DATA", help=data_help)
    audit.add_argument("-o", "--output", default="audit", help="report folder (default: audit)")
    audit.add_argument("--test", metavar="DATA", help="a held-out set (same forms as DATA) to check for leakage")
    backbone_options(audit)
    audit.add_argument("--cv", type=int, default=5, help="cross-validation folds (default: 5)")
    audit.add_argument("--threshold", type=_similarity_threshold, default="auto",
                       help="cosine similarity of features from which images are duplicates, or auto: "
                            "relative to the folder's nearest-neighbour distances (default: auto)")
    audit.add_argument("--cache-dir", help="folder of a disk feature cache, reused by later runs")
    audit.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    audit.add_argument("--random-state", type=int, default=0, help="seed of folds and training (default: 0)")
    audit.add_argument("-v", "--verbose", action="store_true", help="show progress even when not on a terminal")
    engine_options(audit)
    data_options(audit)
    audit.set_defaults(run=_audit)

    export = commands.add_parser(
        "export", help="write a saved model as one ONNX graph (images -> predictions) for onnxruntime",
        description="Export a saved model to ONNX: uint8 images resized and centre-cropped to the "
                    "backbone's input size in, probabilities (or regression outputs, or features) out; "
                    "class names in the model's metadata. Needs the onnx package.")
    export.add_argument("model", metavar="MODEL",
                        help="a model saved by `sktransfer fit` or joblib.dump, or a save_model folder")
    export.add_argument("output", metavar="OUTPUT", help="the .onnx file to write")
    export.set_defaults(run=_export)

    backbones = commands.add_parser(
        "backbones", help="list backbones: weights offline or not, feature size, cost",
        description="List the backbones usable by name, without downloading anything.")
    backbones.add_argument("--offline", action="store_true", help="only those whose weights are on this machine")
    backbones.set_defaults(run=_backbones)
    for command in commands.choices.values():  # whose usage an unknown argument is told with
        command.set_defaults(command_parser=command)
    return parser


def main(argv=None):
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.lines = {}  # the CSV line of each image path read from a CSV file, for messages
    with warnings.catch_warnings():
        # Warnings are told as errors are, in the command line's words: not Python's file:line and source.
        warnings.showwarning = functools.partial(_show_warning, args.command)
        return _run(args)


def _show_warning(command, message, category, filename, lineno, file=None, line=None):
    kind = "" if category is UserWarning else f" ({category.__name__})"
    print(f"sktransfer {command}: warning{kind}: {message}", file=sys.stderr)


def _run(args):
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as e:
        print(f"sktransfer {args.command}: error: {_in_words(e, args.lines, args)}", file=sys.stderr)
        return 1


def _in_words(error, lines, args=None):
    """An error's message in the command line's words: bad images are files, not
    items of ``X``, each with its CSV line when it came from a CSV file (``lines``);
    the backbone and weights ``args`` gave are named by their options."""
    from ._inputs import ImageInputError

    if not isinstance(error, ImageInputError):
        return _options_named(str(error), args)

    def describe(i, item):
        place = lines.get(str(item))
        return repr(safe_text(str(item))) + (f" ({place})" if place else "")

    return "\n".join([f"{len(error.errors)} file(s) cannot be used as images:",
                      *error.listing(describe),
                      "Accepted: image files Pillow reads (JPEG, PNG, WebP, BMP, TIFF, GIF, ...)."])


#: Settings the command line's options give by the same name (``--cache-dir`` gives ``cache_dir``).
_OPTION_SETTINGS = ("backbone", "weights", "device", "cache_dir", "cv")


def _options_named(text, args):
    """``text`` with the settings ``args`` gave (``device='x'``, ``cv=20``; not a --grid
    candidate) as the options that gave them, labels read from DATA as DATA's, and without
    the ways round that only Python has."""
    import re

    for name in _OPTION_SETTINGS:
        value = getattr(args, name, None)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            option = f"--{name.replace('_', '-')} {value}"
            text = re.sub(rf"(?<![\w.]){name}={re.escape(repr(value))}(?![\w.])", lambda m: option, text)
    if getattr(args, "cv", None) is not None:
        text = re.sub(r"\blower cv\b", "lower --cv", text)
    data = getattr(args, "data", None)
    if isinstance(data, str):
        text = re.sub(r"^y has a single class", lambda m: f"{safe_text(data)!r} has images of a single class", text)
    if getattr(args, "backbone", None) is not None:
        text = text.replace(", None, or a path to a state-dict file", ", or a path to a state-dict file")
        text = re.sub(r"Use a name from sktransfer\.list_backbones\(\), 'timm/<model name>', or pass a "
                      r"torch\.nn\.Module\.", "Use a name that `sktransfer backbones` lists, or timm/<model name>.",
                      text)
    return text


if __name__ == "__main__":
    sys.exit(main())
