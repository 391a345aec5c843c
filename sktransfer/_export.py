"""A safer way to share fitted models than pickles: tensors and JSON, no code.

joblib and pickle files run code when they are loaded, so they must only come
from trusted sources. :func:`save_model` writes a folder that holds only data:

- ``model.json``: the estimator's parameters, the backbone's name and
  preprocessing, the classes and the head's shape (and training history);
- ``backbone.pt`` and ``head.pt``: ``state_dict`` tensors, read back with
  ``torch.load(weights_only=True)``, which refuses anything but tensors and
  plain containers.

:func:`load_model` rebuilds the architecture from the backbone registry (no
download, no weights package) and loads the tensors into it.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ._version import __version__
from ._backbones import rebuild_backbone
from ._estimator import (
    ImageEmbedder,
    PretrainedImageClassifier,
    PretrainedImageRegressor,
    _check_device,
    _PretrainedImageModel,
)
from ._images import Preprocessing

__all__ = ["save_model", "load_model"]

FORMAT = "sktransfer-model"
FORMAT_VERSION = 1
MODEL_FILE, BACKBONE_FILE, HEAD_FILE = "model.json", "backbone.pt", "head.pt"
_ESTIMATORS = {cls.__name__: cls for cls in (PretrainedImageClassifier, PretrainedImageRegressor, ImageEmbedder)}


def save_model(estimator, folder):
    """Save a fitted estimator as tensors and JSON, which load without running code.

    Parameters
    ----------
    estimator : PretrainedImageClassifier, PretrainedImageRegressor or ImageEmbedder
        A fitted estimator.
    folder : str or path-like
        Folder to write ``model.json``, ``backbone.pt`` and ``head.pt`` into
        (created if needed; files of an earlier save are replaced).

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
    has_head = isinstance(estimator, _PretrainedImageModel)
    is_classifier = isinstance(estimator, PretrainedImageClassifier)
    check_is_fitted(estimator, "head_" if has_head else "backbone_")
    if getattr(estimator, "unfreeze_", 0):
        raise ValueError(
            f"save_model cannot export a model fine-tuned with unfreeze={estimator.unfreeze_}: its trained "
            "backbone blocks are code as well as tensors. Share it with joblib (trusted sources only)."
        )
    embedder = estimator.embedder_ if has_head else estimator
    backbone = embedder.backbone_
    params, omitted = _params_to_json(estimator.get_params(deep=False))
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
    if is_classifier:
        classes = estimator.classes_
        try:
            values = json.loads(json.dumps(classes.tolist()))
        except (TypeError, ValueError):
            raise ValueError(
                f"classes_ holds labels JSON cannot store ({classes.tolist()[:5]!r}...); "
                "use str, int, float or bool labels, or save with joblib (trusted use only)."
            ) from None
        if np.asarray(values, dtype=classes.dtype).tolist() != classes.tolist():
            raise ValueError(f"classes_ {classes.tolist()!r} do not survive a JSON round trip; use str or int labels.")
        info["classes"] = {"values": values, "dtype": classes.dtype.str if classes.dtype != object else "object",
                           "multilabel": bool(estimator.multilabel_)}
    elif has_head:
        info["targets"] = {
            "mean": np.asarray(estimator.target_mean_, dtype=float).tolist(),
            "scale": np.asarray(estimator.target_scale_, dtype=float).tolist(),
            "single_output": bool(estimator._single_output),
        }
    if has_head:
        head = estimator.head_
        info["head"] = {
            "in_features": backbone.num_features,
            "n_outputs": int(head.module__n_outputs),
            "hidden_units": list(estimator._check_hidden_units()),
            "dropout": estimator.dropout,
            "temperature": float(getattr(estimator, "temperature_", 1.0)),
        }
        try:
            info["history"] = json.loads(json.dumps(list(head.history)))
        except (TypeError, ValueError):  # a custom callback logged something JSON cannot hold
            info["history"] = None
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    torch.save(backbone.module.state_dict(), os.path.join(folder, BACKBONE_FILE))
    if has_head:
        torch.save(estimator.head_.module_.state_dict(), os.path.join(folder, HEAD_FILE))
    with open(os.path.join(folder, MODEL_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return folder


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
    path = os.path.join(folder, MODEL_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"load_model: {folder!r} has no {MODEL_FILE}; expected a folder written by save_model.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"load_model: {path!r} is not valid JSON ({e}).") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"load_model: {path!r} was not written by sktransfer.save_model.")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"load_model: {folder!r} was written by sktransfer {info.get('sktransfer_version')} in a "
            f"newer format ({info['format_version']}) than this sktransfer {__version__} reads "
            f"({FORMAT_VERSION}); upgrade sktransfer."
        )
    kind = _ESTIMATORS.get(info.get("estimator"))
    if kind is None:
        raise ValueError(f"load_model: unknown estimator {info.get('estimator')!r} in {path!r}.")
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
    prep = dict(saved["preprocessing"])
    prep["mean"], prep["std"] = tuple(prep["mean"]), tuple(prep["std"])
    body = rebuild_backbone(architecture, _load_tensors(folder, BACKBONE_FILE), Preprocessing(**prep))

    params = _params_from_json(info["params"])
    if saved["source"] == "module":
        params["backbone"] = backbone
    estimator = kind(**params)
    has_head = issubclass(kind, _PretrainedImageModel)
    embedder = estimator._make_embedder() if has_head else estimator
    embedder.backbone_ = body
    embedder.n_features_out_ = body.num_features
    if has_head:
        from skorch.history import History

        head_info = info["head"]
        n_outputs = head_info["n_outputs"]
        # A stand-in target of the right shape tells _build_head which head to build.
        y_like = np.zeros((1, n_outputs), np.float32)
        if kind is PretrainedImageClassifier:
            classes = info["classes"]
            dtype = object if classes["dtype"] == "object" else np.dtype(classes["dtype"])
            estimator.classes_ = np.asarray(classes["values"], dtype=dtype)
            estimator.multilabel_ = bool(classes.get("multilabel", False))
            if not estimator.multilabel_:
                y_like = np.zeros(1, np.int64)
        else:
            targets = info["targets"]
            estimator.n_outputs_ = n_outputs
            estimator.target_mean_ = np.asarray(targets["mean"])
            estimator.target_scale_ = np.asarray(targets["scale"])
            estimator._single_output = targets["single_output"]
        head = estimator._build_head(
            np.zeros((1, head_info["in_features"]), np.float32), y_like, n_outputs,
            tuple(head_info["hidden_units"]), _check_device(estimator.device, fitted=True),
        )
        head.initialize()
        estimator.unfreeze_ = 0
        if kind is PretrainedImageClassifier:
            from ._head import TemperatureSoftmax

            estimator.temperature_ = head_info.get("temperature", 1.0)
            if estimator.temperature_ != 1.0:
                head.predict_nonlinearity = TemperatureSoftmax(estimator.temperature_)
        try:
            head.module_.load_state_dict(_load_tensors(folder, HEAD_FILE))
        except RuntimeError as e:
            raise ValueError(f"load_model: {HEAD_FILE} does not fit the head described in {MODEL_FILE}: {e}") from None
        if info.get("history"):
            head.history = History(info["history"])
        estimator.embedder_ = embedder
        estimator.head_ = head
    return estimator


def _load_tensors(folder, name):
    path = os.path.join(folder, name)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"load_model: {folder!r} has no {name}.") from None
    except Exception as e:
        raise ValueError(f"load_model: {path!r} is not a tensor file torch.load(weights_only=True) accepts: {e}") from None


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


def _params_from_json(params):
    out = {}
    for key, value in params.items():
        if key == "optimizer" and value is not None:
            # Only a name looked up in torch.optim: JSON never chooses code to import.
            name = str(value).rpartition(".")[2]
            value = getattr(torch.optim, name, None)
            if not (isinstance(value, type) and issubclass(value, torch.optim.Optimizer)):
                raise ValueError(f"load_model: optimizer {name!r} is not an optimizer in torch.optim.")
        out[key] = _tuples(value)
    return out


def _tuples(value):
    """JSON lists back to the tuples the estimators were given (hidden_units, betas, mean, ...)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value
