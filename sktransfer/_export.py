"""A safer way to share fitted models than pickles: tensors and JSON, no code.

joblib and pickle files run code when they are loaded, so they must only come
from trusted sources. :func:`save_model` writes a folder that holds only data:

- ``model.json``: the estimator's parameters, the backbone's name and
  preprocessing, the head's shape and training history, and the rest of
  the fitted state (the classes, the target scaling, ...), which each
  estimator gives as JSON values and checks when it takes them back
  (``_export_state``, ``_import_state``);
- ``backbone-<digest>.pt`` and ``head-<digest>.pt``: ``state_dict``
  tensors, read back with ``torch.load(weights_only=True)``, which refuses
  anything but tensors and plain containers (the head through skorch's
  ``save_params`` and ``load_params``). Each is named by the content digest
  of its bytes, and ``model.json`` names the two it goes with (``files``):
  a new save writes its tensors beside the old ones and then replaces
  ``model.json`` in one rename, so the folder holds the old model or the
  new one whole, whenever a save fails or a reader looks. Format 1 (fixed
  names ``backbone.pt`` and ``head.pt``) is still read.

:func:`load_model` rebuilds the architecture from the backbone registry (no
download, no weights package) and loads the tensors into it. Settings that
belong to the machine (:data:`MACHINE_LOCAL_PARAMS`: a cache folder, a
device, a weights file path) are not written, and are ignored when a folder
holds them: a shared folder cannot point the loader's process at files.
Every field of ``model.json`` is checked, naming it, before anything large
is allocated. The head that predicts is built from the saved shape and the
``module__`` settings only: ``callbacks`` and the prefixed settings that
only train it (``optimizer__``, ``criterion__``, ``callbacks__``, ...) are
kept in the loaded estimator's params and checked by its next ``fit``, as
settings given to ``set_params`` are.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import math
import numbers
import os
import re

import torch
from sklearn.utils.validation import check_is_fitted

from ._version import __version__
from ._backbones import _looks_like_path, rebuild_backbone
from ._cache import DIGEST_SIZE, _read_regular, digest
from ._outputs import make_folders, write_atomic
from ._estimator import ImageEmbedder, PretrainedImageClassifier, PretrainedImageRegressor, _PretrainedImageModel
from ._head import HEAD_PREFIXES
from ._images import Preprocessing

__all__ = ["save_model", "load_model"]

FORMAT = "sktransfer-model"
FORMAT_VERSION = 2
MODEL_FILE = "model.json"
#: The tensor files of format 1, under fixed names; format 2 names them by content (``_TENSOR_FILE``).
BACKBONE_FILE, HEAD_FILE = "backbone.pt", "head.pt"
_TENSOR_FILE = re.compile(r"(backbone|head)-([0-9a-f]{%d})\.pt" % (2 * DIGEST_SIZE))
_ESTIMATORS = {cls.__name__: cls for cls in (PretrainedImageClassifier, PretrainedImageRegressor, ImageEmbedder)}
#: Settings of one machine, never written by save_model nor read by load_model
#: (a loaded model gets the defaults): where features are cached, which device
#: runs, ``weights`` when it is a file path (the weights are in the backbone's tensor
#: file), and how this machine runs the body: ``compile`` and the embedding batch
#: (``embed_batch_size``; an ImageEmbedder's ``batch_size``), so a shared folder
#: cannot make predict embed a whole folder in one batch.
MACHINE_LOCAL_PARAMS = ("cache_dir", "device", "weights", "compile", "embed_batch_size")
#: Bounds checked before anything is allocated from model.json's numbers.
MAX_JSON_BYTES = 64 * 2**20
#: Values (list items and object members, counted by their commas, before parsing) of a
#: model.json: parsed, each is a Python object; 2**21 of them hold a few hundred MB at most.
#: A fit's history of a million batches stays below.
MAX_JSON_VALUES = 2**21
MAX_IMAGE_SIDE = 2048
MAX_FEATURES = 2**20
MAX_OUTPUTS = 2**20
_HEAD_SHAPE_PARAMS = tuple("module__" + name for name in (
    "in_features", "n_outputs", "hidden_units", "mean", "scale", "blocks", "shape"))


def save_model(estimator, folder):
    """Save a fitted estimator as tensors and JSON, which load without running code.

    Parameters
    ----------
    estimator : PretrainedImageClassifier, PretrainedImageRegressor or ImageEmbedder
        A fitted estimator.
    folder : str or path-like
        Folder to write ``model.json`` and the tensor files
        (``backbone-<digest>.pt``, ``head-<digest>.pt``) into, created if
        needed. A model saved there before is replaced whole once the new
        one is written; a save that fails leaves it as it was. A file, or a
        folder of other files (photos, a project), is refused before
        anything is written.

    Returns
    -------
    folder : str

    Notes
    -----
    Parameters JSON cannot hold are left out and listed under
    ``omitted_params`` in ``model.json``: skorch ``callbacks`` and a
    ``RandomState`` ``random_state`` (they only matter for training again),
    an optimizer class outside ``torch.optim``, and a ``torch.nn.Module``
    backbone, whose weights are saved but whose architecture is code: pass a
    module of the same architecture to :func:`load_model`.

    See Also
    --------
    load_model : the matching loader.
    """
    if type(estimator).__name__ not in _ESTIMATORS or not isinstance(estimator, tuple(_ESTIMATORS.values())):
        raise TypeError(
            "save_model saves a PretrainedImageClassifier, a PretrainedImageRegressor or an "
            f"ImageEmbedder, got {type(estimator).__name__}."
        )
    check_is_fitted(estimator)
    check_model_folder(folder)
    state = estimator._export_state()  # refuses what JSON and tensors cannot hold, before any file is written
    backbone, head = estimator._export_parts()
    params, omitted = _params_to_json(_shareable(estimator.get_params(deep=False), type(estimator)))
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sktransfer_version": __version__,
        "estimator": type(estimator).__name__,
        "params": params,
        "omitted_params": omitted,
        "backbone": {
            "name": backbone.name,
            "source": "module" if isinstance(estimator.backbone, torch.nn.Module) else "registry",
            "preprocessing": dataclasses.asdict(backbone.preprocessing),
            "num_features": backbone.num_features,
            "fingerprint": backbone.fingerprint,
        },
    }
    if head is not None:
        info["head"] = {
            "in_features": int(head.module__in_features),
            "n_outputs": int(head.module__n_outputs),
            "hidden_units": [int(u) for u in head.module__hidden_units],
            "dropout": float(head.module__dropout),
        }
        try:
            info["history"] = json.loads(json.dumps(list(head.history)))
        except (TypeError, ValueError):  # a custom callback logged something JSON cannot hold
            info["history"] = None
    for name, value in state.items():  # "classes.values": the field values of the section classes
        *sections, key = name.split(".")
        node = info
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    buffers = {"backbone": io.BytesIO()}
    torch.save(backbone.module.state_dict(), buffers["backbone"])
    if head is not None:
        buffers["head"] = io.BytesIO()
        head.save_params(f_params=buffers["head"])
    tensors = {part: data.getvalue() for part, data in buffers.items()}
    # Named by their content: the new files never replace the ones the folder's model.json
    # names, and the new model.json, one rename, switches from the old model to the new.
    info["files"] = {part: f"{part}-{digest(data)}.pt" for part, data in tensors.items()}
    folder = os.fspath(folder)
    make_folders(folder)
    earlier = set(os.listdir(folder))
    written = []
    try:
        # A link planted in the folder (a shared one) is replaced, never written through.
        for part, data in tensors.items():
            write_atomic(os.path.join(folder, info["files"][part]), data, follow_links=False)
            written.append(info["files"][part])
        write_atomic(os.path.join(folder, MODEL_FILE), json.dumps(info, indent=2).encode("utf-8"),
                     follow_links=False)
    except BaseException:
        _remove(folder, [name for name in written if name not in earlier])
        raise
    # The tensor files of the model replaced, which no model.json names any more.
    _remove(folder, [name for name in earlier
                     if name != MODEL_FILE and is_model_file(name) and name not in info["files"].values()])
    return folder


def check_model_folder(folder):
    """Refuse a ``folder`` :func:`save_model` must not write into: a file, or a folder of
    other files (photos, a project), whose files a save would mix with a model's. A new or
    empty folder, or one a save wrote (``model.json``, or only tensor files of a save
    that was killed), is fine."""
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is a file; save_model writes a folder ({MODEL_FILE} and its tensor "
                         "files): give a new or empty folder, or one a save_model wrote.")
    entries = os.listdir(folder) if os.path.isdir(folder) else []
    if entries and MODEL_FILE not in entries and not all(is_model_file(e) for e in entries):
        raise ValueError(f"{folder!r} is a folder of other files, not a saved model; give a new or empty "
                         "folder, or one a save_model (or `sktransfer fit -o FOLDER/`) wrote.")


def is_model_file(name):
    """Whether a file named ``name`` is one :func:`save_model` writes: ``model.json``, or a tensor
    file of this format or of format 1."""
    return name in (MODEL_FILE, BACKBONE_FILE, HEAD_FILE) or _TENSOR_FILE.fullmatch(name) is not None


def _remove(folder, names):
    """Remove the files ``names`` from ``folder``, as far as possible (what is left is only unused)."""
    for name in names:
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass


def load_model(folder, backbone=None):
    """Load a model written by :func:`save_model`; no code from the folder runs.

    Tensors are read with ``torch.load(weights_only=True)``; the architecture
    is rebuilt from the backbone registry with ``weights=None``, so loading
    needs no network and no weights package.

    Parameters
    ----------
    folder : str or path-like
        A folder written by :func:`save_model`.
    backbone : torch.nn.Module, default=None
        Only for a model fitted with a module as ``backbone``: a module of
        the same architecture (its weights are replaced by the saved ones).

    Returns
    -------
    estimator : PretrainedImageClassifier, PretrainedImageRegressor or ImageEmbedder
        Fitted, ready to ``predict`` / ``transform``.
    """
    folder = os.fspath(folder)
    info = _read_info(folder)
    kind = _ESTIMATORS[info["estimator"]]
    has_head = issubclass(kind, _PretrainedImageModel)
    files = _tensor_files(info, has_head)
    saved = info["backbone"]
    if saved["source"] == "module":
        if not isinstance(backbone, torch.nn.Module):
            raise ValueError(
                f"load_model: this model was fitted with a torch.nn.Module backbone ({saved['name']}), "
                "whose architecture is code and cannot be rebuilt from JSON. Pass a module of the same "
                "architecture: load_model(folder, backbone=module), or share the model with joblib "
                "(trusted sources only)."
            )
        architecture = backbone
    elif backbone is not None:
        raise ValueError(
            f"load_model: backbone= is only for models fitted with a torch.nn.Module; this one uses "
            f"the registry backbone {saved['name']!r}, rebuilt from its name."
        )
    else:
        architecture = saved["name"]
    try:
        preprocessing = Preprocessing(**saved["preprocessing"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_model: backbone.preprocessing in {MODEL_FILE} is not a recipe: {e}") from None
    params = _params_from_json(info["params"], kind)
    if saved["source"] == "module":
        params["backbone"] = backbone
    estimator = kind(**params)
    try:
        estimator._validate_params()
    except ValueError as e:
        raise ValueError(f"load_model: params in {MODEL_FILE}: {e}") from None
    estimator._import_state(_Fields(info))  # the estimator's own fields, each checked
    if has_head:
        head_state, head_bytes = _load_tensors(folder, *files["head"])
        _check_head_shapes(info["head"], head_state, files["head"][0])
    body_state = _load_tensors(folder, *files["backbone"])[0]
    try:
        body = rebuild_backbone(architecture, body_state, preprocessing)
    except ValueError as e:
        raise ValueError(f"load_model: backbone.name in {MODEL_FILE} and {files['backbone'][0]}: {e}") from None
    if body.num_features != saved["num_features"] or (has_head and body.num_features != info["head"]["in_features"]):
        raise ValueError(
            f"load_model: {MODEL_FILE} says the backbone gives {saved['num_features']} features, "
            f"but {saved['name']!r} with {files['backbone'][0]} gives {body.num_features}."
        )
    head = _load_head(estimator, info, body.num_features, head_bytes, files["head"][0]) if has_head else None
    estimator._import_parts(body, head)
    check_is_fitted(estimator)  # the estimator's own account of its fitted state is whole
    return estimator


def _load_head(estimator, info, in_features, data, name):
    """The estimator's head of the saved shape, holding the tensors of the file ``name`` (its bytes
    ``data``, read by skorch's own loader) and the saved training history."""
    from skorch.history import History

    # Untrusted settings reach skorch and torch here (whatever they raise is a bad folder).
    try:
        head = estimator._build_head(in_features, info["head"]["hidden_units"], info["head"]["dropout"])
    except Exception as e:
        shaping = "".join(f", params.{k}" for k in sorted(info["params"]) if k.startswith("module__"))
        raise ValueError(f"load_model: the head cannot be built from head.*{shaping} in {MODEL_FILE}: "
                         f"{type(e).__name__}: {e}") from None
    # Held to tensors only, whatever skorch's version defaults to.
    head.set_params(torch_load_kwargs={"weights_only": True})
    try:
        head.load_params(f_params=io.BytesIO(data))
    except Exception as e:
        raise ValueError(f"load_model: {name} does not fit the head described in {MODEL_FILE}: "
                         f"{type(e).__name__}: {e}") from None
    if info.get("history"):
        head.history = History(info["history"])
    return head


def _tensor_files(info, has_head):
    """``{"backbone": (name, digest), "head": ...}``: the tensor files ``info`` (model.json) goes with,
    and the content digest each must have. Format 2 names them in ``files``, each name carrying its
    digest; format 1 has fixed names, and their digests in ``files`` where a save recorded them
    (None where not: not checked)."""
    parts = ("backbone", "head") if has_head else ("backbone",)
    if info["format_version"] < 2:
        digests = _field(info, "files", dict, default={})
        for name, value in digests.items():
            _check(f"files.{name}", value, str)
        return {part: (name, digests.get(name)) for part, name in zip(parts, (BACKBONE_FILE, HEAD_FILE))}
    for part in _field(info, "files", dict):
        if part not in parts:
            raise _invalid(f"files.{part}", info["files"][part],
                           f"only the keys {list(parts)} (this model's tensor files)")
    files = {}
    for part in parts:
        name = _field(info, f"files.{part}", str)
        match = _TENSOR_FILE.fullmatch(name)
        if match is None or match[1] != part:
            raise _invalid(f"files.{part}", name, f"a file name {part}-<{2 * DIGEST_SIZE} hex digits>.pt")
        files[part] = (name, match[2])
    return files


def _read_saved(path, limit=None):
    """The bytes of the file ``path`` of a model folder: a regular file, never a link (save_model
    writes none), so a FIFO planted there cannot block the loader, nor a link to a device feed it
    without end; a file over ``limit`` bytes is refused unread. FileNotFoundError and
    NotADirectoryError pass through (the callers name what is missing)."""
    try:
        return _read_regular(path, limit=limit, follow_links=False)[1]
    except (FileNotFoundError, NotADirectoryError):
        raise
    except OSError as e:
        if e.errno == errno.EFBIG:
            raise ValueError(f"load_model: {path!r} is larger than {limit} bytes; not written by save_model.") from None
        raise ValueError(f"load_model: {path!r} is not a regular file ({e.strerror}): a link, a FIFO or a device, "
                         "which save_model never writes.") from None


def _refuse_compressed(data, path):
    """Refuse a zip tensor file with compressed records, or records larger than the file:
    ``torch.save`` stores them as they are, and ``torch.load`` would inflate them to
    whatever size they claim before any shape is checked."""
    import zipfile

    if not zipfile.is_zipfile(io.BytesIO(data)):
        return  # not torch's zip format: torch.load says what it is
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        records = archive.infolist()
    if any(r.compress_type != zipfile.ZIP_STORED for r in records) or sum(r.file_size for r in records) > len(data):
        raise ValueError(f"load_model: {path!r} holds compressed records, which torch.save never writes: refused "
                         "unread, as a small file could inflate to any size.")


def _load_tensors(folder, name, expected):
    """``(state_dict, file bytes)`` of the tensor file ``name``, checked to have the content digest
    ``expected`` (unless None), then read with ``weights_only=True``."""
    path = os.path.join(folder, name)
    try:
        data = _read_saved(path)
    except FileNotFoundError:
        raise ValueError(f"load_model: {folder!r} has no {name}, which {MODEL_FILE} names (if a save_model "
                         "into the folder was replacing the model, load it again).") from None
    if expected is not None and digest(data) != expected:
        raise ValueError(
            f"load_model: {name} in {folder!r} is not the one {MODEL_FILE} was saved with (its content "
            "digest differs): the folder mixes files of two saves, or the file was changed. Save the "
            "model again."
        )
    _refuse_compressed(data, path)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"load_model: {path!r} is not a tensor file torch.load(weights_only=True) accepts: {e}") from None
    if not (isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        raise ValueError(f"load_model: {path!r} does not hold a state dict (names and tensors).")
    return state, data


def _read_info(folder):
    """model.json, its format, params, backbone and head checked field by field (a ValueError
    names the first wrong one); the estimator checks the rest in its ``_import_state``."""
    path = os.path.join(folder, MODEL_FILE)
    try:
        data = _read_saved(path, MAX_JSON_BYTES)
    except FileNotFoundError:
        if not os.path.isdir(folder):
            raise ValueError(f"load_model: {folder!r} does not exist; expected a folder written by "
                             "save_model.") from None
        raise ValueError(f"load_model: {folder!r} has no {MODEL_FILE}; expected a folder written by save_model.") from None
    except NotADirectoryError:
        raise ValueError(f"load_model: {folder!r} is a file, not a folder written by save_model (a file "
                         "written by joblib.dump loads with joblib.load, from trusted sources only).") from None
    if data.count(b",") > MAX_JSON_VALUES:
        raise ValueError(f"load_model: {path!r} holds more than {MAX_JSON_VALUES} values; not written by "
                         "save_model.")
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"load_model: {path!r} is not valid JSON ({type(e).__name__}: {e}).") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"load_model: {path!r} was not written by sktransfer.save_model.")
    version = _field(info, "format_version", int, 0, None)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"load_model: {folder!r} was written by sktransfer {info.get('sktransfer_version')} in a "
            f"newer format ({version}) than this sktransfer {__version__} reads "
            f"({FORMAT_VERSION}); upgrade sktransfer."
        )
    if info.get("estimator") not in _ESTIMATORS:
        raise ValueError(f"load_model: unknown estimator {info.get('estimator')!r} in {path!r}; "
                         f"expected one of {sorted(_ESTIMATORS)}.")
    _field(info, "params", dict)
    _field(info, "backbone.name", str)
    _field(info, "backbone.source", str, choices=("module", "registry"))
    _field(info, "backbone.num_features", int, 1, MAX_FEATURES)
    prep = _field(info, "backbone.preprocessing", dict)
    for key, value in prep.items():
        if key.endswith("_size"):  # resize_size, crop_size: an int or (height, width)
            sides = value if isinstance(value, list) else [value]
            for side in sides:
                _check(f"backbone.preprocessing.{key}", side, int, 1, MAX_IMAGE_SIDE)
    for key in ("mean", "std"):
        values = _field(info, f"backbone.preprocessing.{key}", list)
        if len(values) != 3:
            raise ValueError(f"load_model: backbone.preprocessing.{key} in {MODEL_FILE} has {len(values)} "
                             "values; expected 3 (one per channel).")
        for v in values:
            _check(f"backbone.preprocessing.{key}", v, float, 1e-6 if key == "std" else -1e6, 1e6)
    if not issubclass(_ESTIMATORS[info["estimator"]], _PretrainedImageModel):
        return info
    _field(info, "head.n_outputs", int, 1, MAX_OUTPUTS)
    _field(info, "head.in_features", int, 1, MAX_FEATURES)
    for units in _field(info, "head.hidden_units", list):
        _check("head.hidden_units", units, int, 1, MAX_FEATURES)
    _field(info, "head.dropout", float, 0, 1)
    history = info.get("history")
    if history is not None and not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        raise ValueError(f"load_model: history in {MODEL_FILE} must be a list of objects (one per epoch).")
    return info


_MISSING = object()


def _field(info, name, kind, low=None, high=None, choices=None, default=_MISSING):
    """The value at dotted ``name`` in ``info``, checked by :func:`_check`."""
    value = info
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            if default is not _MISSING:
                return default
            raise ValueError(f"load_model: {MODEL_FILE} has no {name}; it was not written by save_model.")
        value = value[part]
    return _check(name, value, kind, low, high, choices)


def _check(name, value, kind, low=None, high=None, choices=None):
    """``value`` if it is a ``kind`` within [low, high] (and among ``choices``), else a ValueError naming it."""
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    what = {float: "a finite number", int: "an integer", bool: "true or false", str: "a string",
            list: "a list", dict: "an object"}[kind]
    if ok and low is not None and value < low or ok and high is not None and value > high:
        ok = False
        what += f" in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
    if ok and choices is not None and value not in choices:
        ok, what = False, f"one of {list(choices)}"
    if not ok:
        raise _invalid(name, value, what)
    return value


def _invalid(name, value, expected):
    """The ValueError for field ``name`` of model.json holding ``value``, not what was ``expected``."""
    return ValueError(f"load_model: {name}={_short(value)} in {MODEL_FILE} is not valid; expected {expected}.")


class _Fields:
    """``read(name, kind, ...)`` for an estimator's ``_import_state``: the fields of one
    untrusted model.json, each returned once :func:`_check` passes (see :func:`_field`)."""

    check = staticmethod(_check)
    invalid = staticmethod(_invalid)

    def __init__(self, info):
        self._info = info

    def __call__(self, name, kind, low=None, high=None, choices=None, default=_MISSING):
        return _field(self._info, name, kind, low, high, choices, default)


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_head_shapes(head_info, state, name):
    """The head described in model.json has the shapes of the tensors in the file ``name``.

    Checked on PyTorch's ``meta`` device (shapes, no memory), so numbers in
    model.json never allocate more than the head's tensor file holds.
    """
    from ._head import HeadModule

    with torch.device("meta"):
        described = HeadModule(head_info["in_features"], head_info["n_outputs"], head_info["hidden_units"])
    expected = {k: tuple(v.shape) for k, v in described.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        raise ValueError(
            f"load_model: head.in_features, head.hidden_units and head.n_outputs in {MODEL_FILE} "
            f"({head_info['in_features']}, {head_info['hidden_units']}, {head_info['n_outputs']}) do not "
            f"describe the tensors in {name}."
        )


def _shareable(params, kind):
    """``params`` of an estimator of class ``kind`` without the settings of one machine
    (:data:`MACHINE_LOCAL_PARAMS`)."""
    return {key: value for key, value in params.items() if not _machine_local(key, value, kind)}


def _machine_local(key, value, kind):
    if key == "batch_size" and issubclass(kind, ImageEmbedder):  # its embedding batch
        return True
    if key != "weights":
        return key in MACHINE_LOCAL_PARAMS
    return isinstance(value, os.PathLike) or (isinstance(value, str) and _looks_like_path(value))


def _to_json(value):
    """``value`` as plain JSON data, or raise TypeError."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _to_json(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def _params_to_json(params):
    kept, omitted = {}, []
    for key, value in params.items():
        if key == "optimizer" and value is not None:  # None: the estimator picks it
            if getattr(torch.optim, getattr(value, "__name__", ""), None) is value:
                kept[key] = "torch.optim." + value.__name__
            else:
                omitted.append(key)
            continue
        try:
            kept[key] = _to_json(value)
        except TypeError:
            omitted.append(key)
    return kept, omitted


def _params_from_json(params, kind):
    known = kind().get_params(deep=False)
    out = {}
    for key, value in _shareable(params, kind).items():
        if key not in known and not key.startswith(HEAD_PREFIXES):
            raise ValueError(f"load_model: params.{key} in {MODEL_FILE} is not a setting of {kind.__name__}.")
        if key in _HEAD_SHAPE_PARAMS:  # the head's shape is head.* in model.json, checked against its tensors
            raise ValueError(f"load_model: params.{key} in {MODEL_FILE} would override the head's shape.")
        if key == "optimizer" and value is not None:
            # Only a name looked up in torch.optim: JSON never chooses code to import.
            name = str(value).rpartition(".")[2]
            value = getattr(torch.optim, name, None)
            if not (isinstance(value, type) and issubclass(value, torch.optim.Optimizer)):
                raise ValueError(f"load_model: optimizer {name!r} is not an optimizer in torch.optim.")
        # callbacks is a list (only an empty one is JSON); other lists were tuples.
        out[key] = list(value) if key == "callbacks" and isinstance(value, list) else _tuples(value)
    return out


def _tuples(value):
    """JSON lists back to the tuples the estimators were given (hidden_units, betas, mean, ...)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value
