"""Stage 6: the scikit-learn estimators users hold.

:class:`ImageEmbedder` turns images into feature vectors with a frozen
backbone (stages 1-4). :class:`PretrainedImageClassifier` and
:class:`PretrainedImageRegressor` are that embedder plus a trainable head
(stage 5) trained by skorch: the same parts, composed (their shared flow is
``_PretrainedImageModel``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import numbers
import os
import warnings
from types import SimpleNamespace

import numpy as np
import torch
from scipy import sparse
from sklearn.base import (
    BaseEstimator, ClassifierMixin, ClassNamePrefixFeaturesOutMixin, RegressorMixin, TransformerMixin,
    is_classifier,
)
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import _check_partial_fit_first_call, check_classification_targets, type_of_target
from sklearn.utils.validation import (
    _check_feature_names, _check_sample_weight, check_array, check_is_fitted, column_or_1d,
)

from ._version import __version__
from ._augment import AUGMENT_PRESETS, TTA_PRESETS, augment_views, copy_augment, is_estimator, tta_views
from ._backbones import build_backbone
from ._cache import check_cache_dir
from ._choices import CLASSIFIER_MAX_EPOCHS, ENGINES, PRECISIONS
from ._engine import check_settings as check_engine_settings
from ._features import extract_features
from ._head import (
    HEAD_PREFIXES,
    BlocksAndHead,
    HeadClassifier,
    HeadModule,
    HeadMultiLabelClassifier,
    HeadRegressor,
    build_head,
    check_head_settings,
    full_batch,
    holds_out,
    resume,
    unexpected_setting,
    warn_unread_settings,
)
# Under this name too because pickles of calibrated models from 0.1.0 refer to it.
from ._head import TemperatureSoftmax as _TemperatureSoftmax
from ._inputs import ImageInputError, as_image_list
from ._repr import visual_block
from ._runtime import limited_threads, seeded_rng, steady_heap


def _without_zero_weights(X, y, sample_weight):
    """``X``, ``y`` and ``sample_weight`` without the images of weight 0 (a DataFrame ``X`` stays one)."""
    items = as_image_list(X)
    y = np.asarray(y)
    if len(y) != len(items):
        raise ValueError(f"X has {len(items)} images but y has {len(y)} labels; they must match.")
    weights = _check_sample_weight(sample_weight, np.empty(len(items)), ensure_non_negative=True)
    keep = np.flatnonzero(weights)
    if len(keep) == len(items):
        return X, y, weights
    X = X.iloc[keep] if hasattr(X, "iloc") else [items[i] for i in keep]
    return X, y[keep], weights[keep]


def _check_columns(estimator, X, reset=False):
    """Record (``reset``) or check the column name of a one-column DataFrame ``X`` of images,
    as scikit-learn's ``feature_names_in_``: a DataFrame at predict must name fit's column."""
    _check_feature_names(estimator, X if hasattr(X, "columns") else None, reset=reset)


def _is_missing(label):
    """None, NaN, pandas.NA or NaT: each way a table marks a missing label."""
    if label is None:
        return True
    try:
        return bool(label != label)
    except TypeError:  # pandas.NA refuses to be a truth value
        return True


class _FittedStateMixin:
    """Fitted state listed once per class, in ``_fitted_attributes``, and pickles that keep it whole.

    ``fit`` sets every listed attribute, so the estimator is fitted when all
    are present (sklearn's ``check_is_fitted`` asks ``__sklearn_is_fitted__``).
    A pickle records the sktransfer release that wrote it; loading refuses a
    pickle from an incompatible release, or one that holds only part of the
    fitted state.

    For :func:`sktransfer.save_model`, which writes no pickle, each class
    gives its fitted state as two kinds of data, as skorch splits a net's
    settings from its ``save_params``: ``_export_state`` (small values as
    JSON) and ``_export_parts`` (the backbone and head, whose tensors are
    saved); ``_import_state`` and ``_import_parts`` take them back.
    """

    #: Names of the attributes ``fit`` sets: the whole fitted state.
    _fitted_attributes = ()

    def __sklearn_is_fitted__(self):
        return all(name in vars(self) for name in self._fitted_attributes)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state["_sktransfer_version"] = __version__
        return state

    def __setstate__(self, state):
        saved = state.get("_sktransfer_version", "unknown")
        if _compatibility(saved) != _compatibility(__version__):
            raise RuntimeError(
                f"This {type(self).__name__} was saved with sktransfer {saved} and cannot be "
                f"loaded with sktransfer {__version__}: install sktransfer=={saved} to load it, "
                "or refit the model with this release."
            )
        missing = [name for name in self._fitted_attributes if name not in state]
        if missing and len(missing) < len(self._fitted_attributes):
            raise RuntimeError(
                f"This {type(self).__name__} pickle holds only part of a fitted model: "
                f"{', '.join(missing)} missing. It is damaged or was not written by sktransfer; "
                "refit the model."
            )
        if hasattr(super(), "__setstate__"):
            super().__setstate__(state)
        else:
            self.__dict__.update(state)

    def _export_state(self):
        """The fitted state besides the tensors: plain JSON values by dotted field name of model.json."""
        return {}

    def _import_state(self, read):
        """Set the fitted state :meth:`_export_state` gave, each value checked.

        Parameters
        ----------
        read : callable
            ``read(name, kind, low=None, high=None, choices=None, default=...)``
            returns the field ``name`` of an untrusted model.json once it is a
            ``kind`` (``int``, ``float``, ``bool``, ``str``, ``list``, ``dict``)
            within the bounds; ``read.check(name, value, kind, low, high)``
            checks one value, and ``read.invalid(name, value, expected)`` is
            the ValueError for a wrong one. Each error names the field.
        """


def _compatibility(version):
    """Releases that share major and minor version read each other's pickles."""
    return ".".join(str(version).split(".")[:2])


def _check_device(device, fitted=False):
    """The torch device to run on; a loaded model falls back to the CPU without CUDA."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        if fitted:
            warnings.warn(f"device={device!r} but CUDA is not available here; using the CPU.", stacklevel=3)
            return "cpu"
        raise ValueError(f"device={device!r} but CUDA is not available on this machine; use device='cpu'.")
    return str(dev)


class ImageEmbedder(_FittedStateMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Turn images into feature vectors with a frozen, pretrained backbone.

    A scikit-learn transformer: ``transform`` maps each image (a path, encoded
    bytes, a PIL image or a uint8 array) to the pooled output of the backbone
    body. Each image runs through the backbone once: features are cached by
    image content in a process-wide memory cache, and in ``cache_dir`` when
    given, so clones in a grid search and later calls reuse them.

    Parameters
    ----------
    backbone : str or torch.nn.Module, default="efficientnet_lite0"
        A name from :func:`sktransfer.list_backbones` (the default's ImageNet
        weights ship with the package), ``"timm/<model>"``, or a module that
        returns a feature vector or map per image.
    weights : str, path-like or None, default="DEFAULT"
        ``"DEFAULT"`` for the backbone's pretrained weights, a torchvision
        weights name (e.g. ``"IMAGENET1K_V1"``), a path to a state-dict file
        (read with ``torch.load(weights_only=True)``), or None for random
        initialisation. A file is preprocessed as the weights it holds were
        trained when it is a torchvision checkpoint under its download name
        (``resnet50-0676ba61.pth``: ``IMAGENET1K_V1``'s recipe); any other
        file gets the recipe of the name's default weights (``preprocessing``
        overrides it).
    preprocessing : dict or None, default=None
        Override the weights' preprocessing with keys ``resize_size``,
        ``crop_size``, ``interpolation``, ``mean``, ``std``.
    batch_size : int, default=8
        Images per backbone forward pass.
    cache_dir : str, path-like or None, default=None
        Folder of a disk feature cache shared across processes and sessions
        (``~`` is the home folder).
    device : str, default="cpu"
        Torch device of the backbone (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    compile : bool or "auto", default="auto"
        Run the backbone through ``torch.compile`` (a sixth more CPU
        throughput for the default backbone in docs/benchmarks.md, after up to
        tens of seconds of compilation). "auto" compiles only when one call
        embeds at least 20,000 new images; without a working compiler it runs
        eagerly. Features agree within float
        tolerance either way.
    engine : {"auto", "torch", "openvino"}, default="auto"
        What runs the frozen backbone. "openvino" is Intel's CPU inference
        runtime (several times faster where the CPU has matrix units);
        "auto" picks it on the CPU where it is installed, once the body is
        converted (a few seconds, kept on disk for later processes) or for a
        call of at least 500 images, and PyTorch otherwise. Where OpenVINO
        is missing or cannot convert the backbone, PyTorch runs it (told
        once). Whatever needs gradients (the head, ``unfreeze`` blocks,
        Grad-CAM) runs in PyTorch.
    precision : {"auto", "float32", "bfloat16"}, default="auto"
        Arithmetic of the backbone. "auto" is float32: every path it picks
        keeps each image's features within cosine similarity 0.999 of
        float32 PyTorch. "bfloat16" is about twice as fast in OpenVINO where
        the CPU computes it natively (Intel AMX or AVX-512 BF16), with
        features less close (least cosine 0.9926 over 480 real photos on
        AMX, 0.981 over 840 on AVX-512 BF16; 1st percentile 0.994; see
        docs/faq.md); on a CPU without native bfloat16 every engine computes
        float32 (told once). Features of each precision are cached apart.
    verbose : int, default=0
        Show a progress bar while embedding when > 0.

    Attributes
    ----------
    backbone_ : Backbone
        The frozen body with its preprocessing and fingerprint.
    n_features_out_ : int
        Length of the feature vectors.
    n_features_in_ : int
        1: the images are one input column.
    feature_names_in_ : ndarray of shape (1,)
        The column's name, when ``fit`` was given a DataFrame with one.

    See Also
    --------
    PretrainedImageClassifier : this embedder plus a trained head.

    Examples
    --------
    >>> from sktransfer import ImageEmbedder, load_image_folder
    >>> paths, labels = load_image_folder("sktransfer/data/trash_sample")
    >>> ImageEmbedder().fit_transform(paths[:4]).shape
    (4, 1280)
    """

    _parameter_constraints = {
        "backbone": [str, torch.nn.Module],
        "weights": [str, os.PathLike, None],
        "preprocessing": [dict, None],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "cache_dir": [str, os.PathLike, None],
        "device": [str, torch.device],
        "compile": ["boolean", StrOptions({"auto"})],
        "engine": [StrOptions(set(ENGINES))],
        "precision": [StrOptions(set(PRECISIONS))],
        "verbose": ["verbose"],
    }
    # feature_names_in_, set when X has column names, is optional, as in scikit-learn.
    _fitted_attributes = ("backbone_", "n_features_out_", "n_features_in_")

    def __init__(self, backbone="efficientnet_lite0", weights="DEFAULT", preprocessing=None,
                 batch_size=8, cache_dir=None, device="cpu", compile="auto", verbose=0,
                 engine="auto", precision="auto"):
        self.backbone = backbone
        self.weights = weights
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.device = device
        self.compile = compile
        self.verbose = verbose
        self.engine = engine
        self.precision = precision

    def fit(self, X=None, y=None):
        """Load the backbone. ``X`` is checked but not embedded (nothing is learned)."""
        self._validate_params()
        check_cache_dir(self.cache_dir)
        if X is not None:
            as_image_list(X)
        _check_columns(self, X, reset=True)
        _check_device(self.device)
        check_engine_settings(self.engine, self.precision, self.device, self.compile)
        self._set_backbone(build_backbone(self.backbone, self.weights, self.preprocessing))
        return self

    def _set_backbone(self, backbone):
        self.backbone_ = backbone
        self.n_features_out_ = backbone.num_features
        # X is one column of images, given or not: recorded so a ColumnTransformer
        # (or get_feature_names_out) can check the input names it passes.
        self.n_features_in_ = 1

    def _export_parts(self):
        """``(backbone, head)``: the parts whose tensors save_model writes (no head here)."""
        return self.backbone_, None

    def _import_parts(self, backbone, head=None):
        """Become fitted around ``backbone``, rebuilt with its saved tensors."""
        self._set_backbone(backbone)
        # Its weights may have come from a file whose path was not saved (weights= is the
        # default now): continued training keeps this body (see _PretrainedImageModel._fit).
        self._saved_body = True

    def transform(self, X):
        """Feature vectors of the images in ``X``.

        Returns
        -------
        features : ndarray of shape (n_images, n_features_out_), float32
        """
        check_is_fitted(self)
        _check_columns(self, X)
        return self._embed_items(as_image_list(X))

    def _embed_items(self, items, name="X"):
        """Features of a list of image items; errors name them as items of ``name``."""
        return extract_features(
            items,
            self.backbone_,
            name=name,
            batch_size=self.batch_size,
            cache_dir=self.cache_dir,
            device=_check_device(self.device, fitted=True),
            progress=self.verbose > 0,
            compile=self.compile,
            engine=self.engine,
            precision=self.precision,
        )

    @property
    def _n_features_out(self):
        return self.n_features_out_

    def _sk_visual_block_(self):
        return visual_block(self)  # the notebook diagram: the backbone summarised

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = True
        tags.transformer_tags.preserves_dtype = []  # float32 features, whatever the images
        return tags


class _PretrainedImageModel(_FittedStateMixin, BaseEstimator):
    """An :class:`ImageEmbedder` (``embedder_``) and a skorch head (``head_``) trained on its features.

    The flow shared by :class:`PretrainedImageClassifier` and
    :class:`PretrainedImageRegressor`: check the inputs, embed the images
    (once; cached), build the head (``_head.build_head``) and train it. Subclasses
    say what the targets are (``_prepare_targets``: those of the images of
    weight above 0, which training keeps, and their indices), which skorch net and
    loss learn them (``_head_task``), and what a target looks like to a head
    rebuilt for saved weights (``_stand_in_target``: one image's target and
    the number of outputs).
    """

    def __setstate__(self, state):
        if "head_" in state:  # fitted before n_features_in_ was recorded: one column of images
            state.setdefault("n_features_in_", 1)
            state.setdefault("weight_decay_", None)  # fitted before the strength was recorded
        super().__setstate__(state)

    _parameter_constraints = {
        **ImageEmbedder._parameter_constraints,
        "hidden_units": [tuple, list],
        "dropout": [Interval(numbers.Real, 0, 1, closed="left")],
        "lr": [Interval(numbers.Real, 0, None, closed="neither")],
        "weight_decay": [Interval(numbers.Real, 0, None, closed="left"), StrOptions({"auto"})],
        "max_epochs": [Interval(numbers.Integral, 1, None, closed="left")],
        "optimizer": [type, None],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "n_iter_no_change": [Interval(numbers.Integral, 1, None, closed="left")],
        "callbacks": [list, None],
        "embed_batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "warm_start": ["boolean"],
        "augment": [StrOptions(set(AUGMENT_PRESETS)), callable, None],
        "n_views": [Interval(numbers.Integral, 1, None, closed="left")],
        "unfreeze": [Interval(numbers.Integral, 0, None, closed="left")],
        "backbone_lr_mult": [Interval(numbers.Real, 0, None, closed="neither")],
    }

    def __init__(self, backbone, weights, preprocessing, *, hidden_units, dropout, lr, weight_decay,
                 max_epochs, batch_size, optimizer, early_stopping, validation_fraction,
                 n_iter_no_change, callbacks, embed_batch_size, cache_dir, device, compile,
                 random_state, verbose, warm_start, augment, n_views, unfreeze, backbone_lr_mult,
                 engine="auto", precision="auto", **kwargs):
        self.backbone = backbone
        self.weights = weights
        self.preprocessing = preprocessing
        self.hidden_units = hidden_units
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.callbacks = callbacks
        self.embed_batch_size = embed_batch_size
        self.cache_dir = cache_dir
        self.device = device
        self.compile = compile
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start
        self.augment = augment
        self.n_views = n_views
        self.unfreeze = unfreeze
        self.backbone_lr_mult = backbone_lr_mult
        self.engine = engine
        self.precision = precision
        # Other settings (skorch's, by prefix) are stored as given and checked at fit.
        vars(self).update(kwargs)

    # -- skorch settings routed by prefix, stored and checked as skorch does ----

    def _extra_settings(self):
        """Settings stored besides the named parameters: skorch's, by prefix (checked at fit)."""
        named = self._get_param_names()
        return {k: v for k, v in vars(self).items()
                if k not in named and not k.startswith("_") and not k.endswith("_")}

    def get_params(self, deep=True):
        params = super().get_params(deep=False)
        for key, value in list(params.items()) if deep else ():
            if is_estimator(value):  # not a torchvision transform's static get_params
                params.update((f"{key}__{k}", v) for k, v in value.get_params().items())
        params.update(self._extra_settings())
        return params

    def set_params(self, **params):
        """Set parameters, and skorch settings by prefix (``optimizer__betas``, ...).

        A name that is neither is refused at once, with the closest setting,
        as scikit-learn's ``set_params`` refuses it (so a grid search with a
        misspelt name fails before its first fit).
        """
        named = self._get_param_names()
        for key in params:
            # The signature's own ``**kwargs`` name (scikit-learn's smoke test of
            # set_params passes it) is stored, and refused at fit like any other.
            if key not in named and key != "kwargs" and not key.startswith(HEAD_PREFIXES):
                raise unexpected_setting(key, named, type(self).__name__, _elsewhere(type(self)))
        vars(self).update({k: v for k, v in params.items() if k not in named})
        super().set_params(**{k: v for k, v in params.items() if k in named})
        return self

    def __sklearn_clone__(self):
        """An unfitted copy, as :func:`sklearn.base.clone` makes it, but for ``augment``:
        a transform is deep-copied, an estimator cloned.

        scikit-learn takes any object with a ``get_params`` for an estimator, and
        torchvision's ``RandomResizedCrop``, ``RandomCrop`` and ``ColorJitter`` have a
        static ``get_params`` of another kind; so ``GridSearchCV`` and
        ``cross_val_score`` clone estimators whose ``augment`` is one of them.
        """
        # Every other parameter (and the metadata requests) as scikit-learn clones them.
        stand_in = object.__new__(type(self))  # no __setstate__: a fitted model's state is not checked
        vars(stand_in).update(vars(self), augment=None)
        new = super(_PretrainedImageModel, stand_in).__sklearn_clone__()
        new.augment = copy_augment(self.augment)
        return new

    # -- fitting ---------------------------------------------------------------

    def _make_embedder(self):
        return ImageEmbedder(
            backbone=self.backbone, weights=self.weights, preprocessing=self.preprocessing,
            batch_size=self.embed_batch_size, cache_dir=self.cache_dir, device=self.device,
            compile=self.compile, verbose=self.verbose, engine=self.engine, precision=self.precision,
        )

    def _check_hidden_units(self):
        units = self.hidden_units
        if not all(isinstance(u, numbers.Integral) and u > 0 for u in units):
            raise ValueError(
                f"hidden_units={units!r} must be a tuple of positive integers, "
                "e.g. () for a linear head or (256,) for one hidden layer."
            )
        return tuple(int(u) for u in units)

    def fit(self, X, y=None, sample_weight=None):
        """Embed the images (once; cached) and train the head.

        With ``warm_start=True`` and a fitted model, training continues from
        the current head for ``max_epochs`` more epochs instead of starting
        over.

        Parameters
        ----------
        X : sequence of images
            Paths, encoded bytes, PIL images or HxWx3 uint8 arrays.
        y : array-like
            The target of each image (see the estimator).
        sample_weight : array-like of shape (n_images,), default=None
            Per-image weights in the loss. Images of weight 0 are left out (not
            embedded, nor counted in the classes, the class frequencies of
            ``class_weight="balanced"``, the feature and target statistics, the
            tuning folds or the held-out split), as if not given; a classifier
            needs images of two classes with weight above 0.

        Returns
        -------
        self
        """
        continuing = "warm_start=True" if self.warm_start and hasattr(self, "head_") else None
        return self._fit(X, y, sample_weight, continuing=continuing)

    def _fit(self, X, y, sample_weight, *, continuing=None, classes=None, epochs=None):
        """Check, embed, train. ``continuing`` names why the fitted head is trained further
        (``"warm_start=True"`` or ``"partial_fit"``); ``epochs`` is set by ``partial_fit``."""
        self._validate_params()
        hidden_units = self._check_hidden_units()
        if epochs is not None and self.early_stopping:
            raise ValueError(
                "early_stopping=True holds out part of the training data and stops on it, which "
                "partial_fit cannot do on each batch; set early_stopping=False to use partial_fit."
            )
        if epochs is not None and getattr(self, "calibration", None) is not None:
            raise ValueError(
                f"calibration={self.calibration!r} holds out part of the training data and fits the "
                "temperature on it, which partial_fit cannot do on each batch; set calibration=None to "
                "use partial_fit."
            )
        if continuing:
            _check_columns(self, X)
        items = as_image_list(X)
        y_train, weights, n_outputs, fitted, kept = self._prepare_targets(
            y, len(items), sample_weight, continuing=continuing, classes=classes
        )
        # Images of weight 0 are left out, as if not given (as in scikit-learn): out of the classes,
        # the feature statistics, the tuning folds, the held-out split and the batches too.
        items = [items[i] for i in kept]
        device = _check_device(self.device)
        # partial_fit trains on batches as they come, so even its first call is not a full-batch fit.
        incremental = bool(continuing) or epochs is not None
        net, task, params, extra = self._checked_head_settings(y_train, n_outputs, incremental)
        full = full_batch(params, extra, incremental, multilabel=issubclass(net, HeadMultiLabelClassifier))
        if full:
            defaults = {k: p.default for k, p in inspect.signature(type(self)).parameters.items()}
            warn_unread_settings(params, defaults, extra)

        embedder = self._make_embedder().fit()
        if continuing and self._keeps_saved_body(embedder):
            embedder._import_parts(self.embedder_.backbone_)
        if continuing:
            self._check_same_head(embedder, hidden_units, continuing)
        if self.unfreeze:
            embedder.backbone_.prefix(self.unfreeze)  # an unsupported split fails before embedding
        data = {}
        try:
            if self.augment is None:
                Z = self._embed(embedder, items, None, self.unfreeze)
            else:
                # One backbone pass per image and view, cached: shape (n_images, n_views, n_features).
                views = augment_views(self.augment, self.n_views, self._seed(),
                                      embedder.backbone_.preprocessing)
                Z = np.stack([self._embed(embedder, items, v, self.unfreeze) for v in views], axis=1)
                if holds_out(self.early_stopping, getattr(self, "calibration", None)):
                    # The held-out images are scored on the plain photo, as predict scores them.
                    data["X_eval"] = self._embed(embedder, items, None, self.unfreeze)
        except ImageInputError as e:  # named by their index in X, not among the kept images
            raise ImageInputError([(kept[i], item, reason) for i, item, reason in e.errors], e.name) from None
        # Fine-tuning runs backbone blocks every step: keep their buffers in the heap too.
        heap = steady_heap() if self.unfreeze else contextlib.nullcontext()
        # The held-out split's seed and the tuning folds' (fresh when random_state is None;
        # the folds then take 0: see _head._tuning_folds).
        seed = self._seed()
        with seeded_rng(None if self.random_state is None else seed, device), \
                limited_threads(enabled=not self.unfreeze), heap:
            head = build_head(params, extra, Z, y_train, weights, n_outputs, net=net, task=task,
                              hidden_units=hidden_units, device=device, backbone=embedder.backbone_,
                              seed=seed, stratified=is_classifier(self) and y_train.ndim == 1,
                              continuing=incremental)
            if continuing:
                resume(head, self.head_)
            data.update(X=Z, sample_weight=weights)
            if incremental:
                head.partial_fit(data, y_train, epochs=epochs or self.max_epochs)
            else:
                head.fit(data, y_train)
        if head.interrupted_:  # skorch swallowed it; re-raise without keeping a half-trained head
            raise KeyboardInterrupt("fit was interrupted; the estimator keeps its previous state.")
        fitted.update(self._after_training(head))
        fitted["unfreeze_"] = int(self.unfreeze)
        fitted["weight_decay_"] = float(head.l2) if full else None
        # Fitted state is assigned together at the end: an interrupted fit
        # leaves the estimator as it was before.
        for name, value in fitted.items():
            setattr(self, name, value)
        self.embedder_ = embedder
        self.head_ = head
        self.n_features_in_ = 1  # one column of images, as ImageEmbedder records it
        if not continuing:
            _check_columns(self, X, reset=True)
        return self

    @staticmethod
    def _kept_images(weights, weighed_by):
        """Indices of the images of weight above 0, which training keeps (the others are
        left out as if not given); ``weighed_by`` names what gave the weights, for the
        error when none is left."""
        kept = np.flatnonzero(weights)
        if not len(kept):
            raise ValueError(f"{weighed_by} gives every image weight 0; at least one needs weight above 0 "
                             "(images of weight 0 are left out of training).")
        return kept

    def _checked_head_settings(self, y_train, n_outputs, incremental):
        """The skorch net and loss for the encoded targets ``y_train``, and the head's
        settings (:meth:`_head_settings`), refused by :func:`check_head_settings` where
        the head cannot take them; no image is read."""
        net, task = self._head_task(y_train, n_outputs)
        params, extra = self._head_settings()
        check_head_settings(params, extra, y_train, task=task, module=BlocksAndHead if self.unfreeze else HeadModule,
                            classifier=is_classifier(self), owner=type(self).__name__, continuing=incremental,
                            elsewhere=_elsewhere(type(self)))
        return net, task, params, extra

    def _check_fit_settings(self, y, folds=(), where=""):
        """Refuse, before any image is read, the settings ``fit`` would refuse for the
        labels ``y`` (no sample weights) and for each training fold ``y[train]`` of
        ``folds`` (index arrays), whose messages say so with ``where`` (e.g. ``"cv=3"``).

        Returns the head's settings (:meth:`_checked_head_settings`) for all of ``y``.
        """
        self._validate_params()
        self._check_hidden_units()
        check_cache_dir(self.cache_dir)

        def check(labels):
            y_train, _, n_outputs, _, _ = self._prepare_targets(labels, len(labels), None)
            return self._checked_head_settings(y_train, n_outputs, False)

        checked = check(y)
        for train in folds:
            try:
                check(np.asarray(y)[train])
            except ValueError as e:
                raise ValueError(f"{e} (in a training fold of {where})") from None
        return checked

    def _head_settings(self):
        """The parameters the head is built from, and the other (prefixed skorch) settings."""
        extra = self._extra_settings()
        params = {k: v for k, v in self.get_params(deep=False).items() if k not in extra}
        return params, extra

    def _embed(self, embedder, items, view=None, unfreeze=0):
        """Features of ``items`` (boundary activations when fine-tuning), under ``view``."""
        if view is None and not unfreeze:
            return embedder.transform(items)
        backbone = embedder.backbone_.prefix(unfreeze) if unfreeze else embedder.backbone_
        return extract_features(
            items, backbone, batch_size=embedder.batch_size, cache_dir=embedder.cache_dir,
            device=_check_device(embedder.device, fitted=True), progress=embedder.verbose > 0,
            compile=embedder.compile, view=view, engine=embedder.engine, precision=embedder.precision,
        )

    def _after_training(self, head):
        """Fitted attributes computed from the trained head (none here)."""
        return {}

    def _keeps_saved_body(self, embedder):
        """Whether continued training keeps a loaded model's saved body rather than the one
        ``embedder`` built from the parameters: the path of a weights file is not saved, so
        ``weights`` is the default after loading, and it builds another body. Kept while the
        backbone settings are still those of the loaded model."""
        fitted, built = self.embedder_.backbone_, embedder.backbone_
        return (getattr(self.embedder_, "_saved_body", False) and built.fingerprint != fitted.fingerprint
                and self.weights == "DEFAULT" and built.name == fitted.name
                and built.preprocessing == fitted.preprocessing)

    def _check_same_head(self, embedder, hidden_units, continuing):
        """Refuse to continue training a head on other features or of another shape."""
        if embedder.backbone_.fingerprint != self.embedder_.backbone_.fingerprint:
            raise ValueError(
                f"{continuing} continues training the fitted head, but backbone={self.backbone!r} "
                f"(with these weights and preprocessing) gives other features than "
                f"{self.embedder_.backbone_.name!r}, the one it was trained on; restore the backbone "
                "settings, or set warm_start=False and call fit to start over."
            )
        if int(self.unfreeze) != getattr(self, "unfreeze_", 0):
            raise ValueError(
                f"{continuing} continues training the fitted head, which was trained with "
                f"unfreeze={getattr(self, 'unfreeze_', 0)}, but unfreeze={self.unfreeze} now; restore it, "
                "or set warm_start=False and call fit to start over."
            )
        trained = (tuple(self.head_.module__hidden_units), self.head_.module__dropout)
        if (hidden_units, self.dropout) != trained:
            raise ValueError(
                f"{continuing} continues training the fitted head, which has hidden_units={trained[0]!r} "
                f"and dropout={trained[1]!r}, but they are now hidden_units={hidden_units!r} and "
                f"dropout={self.dropout!r}; restore them, or set warm_start=False and call fit to start over."
            )

    # -- the fitted state as data, for save_model / load_model ---------------------

    def _export_state(self):
        if self.unfreeze_:
            raise ValueError(
                f"save_model cannot export a model fine-tuned with unfreeze={self.unfreeze_}: its trained "
                "backbone blocks are code as well as tensors. Share it with joblib (trusted sources only)."
            )
        state = super()._export_state()
        if self.weight_decay_ is not None:
            state["head.weight_decay"] = float(self.weight_decay_)
        return state

    def _import_state(self, read):
        self.weight_decay_ = read("head.weight_decay", float, 0, None, default=None)

    def _export_parts(self):
        return self.embedder_.backbone_, self.head_

    def _build_head(self, in_features, hidden_units, dropout):
        """An initialised, untrained head of the fitted shape, for saved weights (see ``load_model``).

        It only predicts: it has the trained head's ``dropout`` and no
        fine-tuned blocks (save_model refuses those), whatever ``set_params``
        said after fit, and of the prefixed settings only ``module__`` ones
        reach it. ``callbacks`` and the settings that only train
        (``callbacks__``, ``optimizer__``, ``criterion__``,
        ``iterator_train__``, ``iterator_valid__``, ``dataset__``) stay in the
        estimator's params, for the next fit to use and check.
        """
        y_like, n_outputs = self._stand_in_target()
        net, task = self._head_task(y_like, n_outputs)
        params, extra = self._head_settings()
        params.update(dropout=dropout, unfreeze=0, callbacks=None)
        extra = {k: v for k, v in extra.items() if k.startswith("module__") and k != "module__dropout"}
        head = build_head(params, extra, np.zeros((1, in_features), np.float32), y_like, np.ones(1, np.float32),
                          n_outputs, net=net, task=task, hidden_units=tuple(hidden_units),
                          device=_check_device(self.device, fitted=True), continuing=True)
        return head.initialize()

    def _import_parts(self, backbone, head=None):
        """Become fitted with ``backbone`` and ``head`` (from ``_build_head``), holding their saved tensors."""
        embedder = self._make_embedder()
        embedder._import_parts(backbone)
        self.unfreeze_ = 0  # save_model refuses fine-tuned models
        self.embedder_ = embedder
        self.head_ = head
        self.n_features_in_ = 1

    def _seed(self):
        """A seed drawn from ``random_state`` (a fresh one when it is None). With a fixed
        random_state the validation split and the augmented views are fixed too, so every
        grid candidate reuses the cached views."""
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    # -- prediction ------------------------------------------------------------

    @property
    def history_(self):
        check_is_fitted(self)
        return self.head_.history

    def _sk_visual_block_(self):
        return visual_block(self)  # the notebook diagram: backbone, then head

    def _features(self, X, view=None):
        check_is_fitted(self)
        return self._embed(self.embedder_, as_image_list(X), view, self.unfreeze_)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags


class PretrainedImageClassifier(ClassifierMixin, _PretrainedImageModel):
    """Image classifier: a frozen pretrained backbone and a new head trained by skorch.

    ``fit``, ``predict``, ``predict_proba`` and ``score`` take images (paths,
    bytes, PIL images or uint8 arrays) and work in Pipelines, GridSearchCV
    and cross-validation. The backbone runs once per image: features are
    cached by content (see :class:`ImageEmbedder`), so every epoch, fold and
    grid candidate after the first reuses them; only the head trains.

    ``y`` is one label per image, or, for multi-label problems, a 2-D 0/1
    indicator matrix with one column per label (as
    :class:`~sklearn.preprocessing.MultiLabelBinarizer` gives): then the head
    has one sigmoid output per label and ``predict`` returns an indicator
    matrix, as scikit-learn's multi-label classifiers do.

    Parameters
    ----------
    backbone, weights, preprocessing, cache_dir, device, compile, engine, precision
        As in :class:`ImageEmbedder`.
    hidden_units : tuple of int, default=()
        Hidden layer widths of the head; ``()`` is a linear head.
    dropout : float, default=0.0
        Dropout before each linear layer of the head. A head with dropout is
        trained by AdamW (L-BFGS's line search needs the same loss at every
        evaluation).
    lr : float, default=3e-3
        Learning rate of the head's optimizer (AdamW's; the full-batch linear
        head, see ``optimizer``, is fitted by L-BFGS with a line search and
        does not use it).
    weight_decay : float or "auto", default="auto"
        The L2 strength of the full-batch linear head (see ``optimizer``):
        its loss is the (sample-weighted) mean over images plus
        ``weight_decay / 2`` times the sum of squared weights,
        ``LogisticRegression(C=1 / (weight_decay * n))`` on the standardised
        features, ``n`` being the number of images (the sum of the sample
        weights, with ``class_weight``, when given); for two classes
        ``C=2 / (weight_decay * n)`` (both logits are penalised, and
        scikit-learn's binary model has one weight vector, their difference). ``"auto"`` chooses it by
        3-fold cross-validation on the cached training features, as
        ``LogisticRegressionCV`` does: strengths from 10 down to 0.001,
        strongest first, until two in a row have not improved on the best
        (docs/accuracy.md). For the heads AdamW trains, a number is AdamW's
        (decoupled) weight decay and ``"auto"`` is 1e-4; for an ``optimizer``
        without weight decay, an L2 penalty in the loss.
    max_epochs : int, default=15
        Epochs of head training (for the full-batch linear head, L-BFGS
        steps, ending early once a step no longer lowers the loss).
    batch_size : int, default=64
        Mini-batch size of head training (the full-batch linear head takes
        all training images as one batch).
    optimizer : torch optimizer class or None, default=None
        Any of its arguments can be set as ``optimizer__<name>``. None: a
        linear head without dropout on plain features (no ``unfreeze`` or
        ``augment``), trained by ``fit`` (not ``partial_fit`` or
        ``warm_start=True``) and without ``optimizer__*`` settings, is fitted
        full batch by ``torch.optim.LBFGS`` (each epoch one L-BFGS step with
        its own line search, so ``lr`` and ``batch_size`` do not apply) to
        the optimum of its penalised loss; other heads (and multi-label ones)
        by ``torch.optim.AdamW``.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the training data (stratified for
        single-label y) and stop when the validation loss has not improved for
        ``n_iter_no_change`` epochs, keeping the best epoch's weights.
    validation_fraction : float, default=0.1
        Share of the training data held out when ``early_stopping``.
    n_iter_no_change : int, default=5
        Patience of early stopping, in epochs.
    class_weight : dict, "balanced" or None, default=None
        Weights of the classes in the loss, as in scikit-learn (single-label
        y only).
    callbacks : list of skorch callbacks or None, default=None
        Extra skorch callbacks for the head's training.
    embed_batch_size : int, default=8
        Images per backbone forward pass.
    random_state : int, RandomState or None, default=None
        Seeds head initialisation, shuffling and the validation split, so
        equal seeds give equal models.
    verbose : int, default=0
        Print skorch's epoch table and show an embedding progress bar when > 0.
    warm_start : bool, default=False
        When True, ``fit`` on a fitted model continues training its head
        (weights, optimizer state and history) for ``max_epochs`` more epochs
        instead of starting over; ``y`` must have the same classes. Such a
        head is AdamW's from its first fit on (see ``optimizer``); a
        full-batch linear head fitted without ``warm_start`` continues with a
        fresh AdamW, whose ``weight_decay`` is then the decoupled decay.
    augment : {"flip", "light", "strong"}, callable or None, default=None
        Training augmentation at cached cost: each training image is embedded
        under ``n_views`` random augmentations once, and each epoch the head
        sees one view per image. ``"flip"``: horizontal flips; ``"light"``:
        random resized crops (50-100% of the area) and flips; ``"strong"``:
        crops down to 25%, flips and colour jitter. A callable is a
        torchvision transform taking and returning a PIL image (no
        ToTensor/Normalize: the weights' preprocessing follows). Views are
        seeded from ``random_state`` and cached, so grid candidates reuse them.
        Images held out for ``early_stopping`` or ``calibration`` are scored
        on the plain photo, as ``predict`` scores them.
    n_views : int, default=4
        Augmented views embedded per training image when ``augment`` is set.
    unfreeze : int, default=0
        Fine-tune the last ``unfreeze`` blocks of the backbone with the head
        (a trained copy of them is kept in the model; the shared backbone
        stays frozen). The frozen part's activations are cached, so it still
        runs once per image (per view). BatchNorm statistics in the trained
        blocks stay frozen (eval mode). Supported for EfficientNet-style and
        ResNet-style backbones.
    backbone_lr_mult : float, default=0.1
        Learning rate of the unfrozen blocks as a multiple of ``lr``.
    tta : {"flip", "flip+shift"} or None, default=None
        Test-time augmentation: ``predict_proba`` averages the probabilities
        of the plain image and its mirror image (``"flip"``), plus four
        views shifted towards the corners (``"flip+shift"``). ``predict`` and
        ``score`` follow ``predict_proba``.
    calibration : {"temperature"} or None, default=None
        Hold out ``validation_fraction`` of the training data (stratified;
        the early-stopping split when ``early_stopping``) and fit a
        temperature on it that divides the logits, so that probabilities are
        calibrated; predictions (the argmax) do not change.
    **kwargs
        skorch settings routed by prefix, as skorch names them:
        ``module__*``, ``criterion__*`` (e.g. ``criterion__label_smoothing``),
        ``optimizer__*``, ``iterator_train__*``, ``iterator_valid__*``,
        ``callbacks__*``, ``dataset__*``. Stored as given and checked at
        ``fit``, where a misspelt one is named with the closest setting.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The class labels, as given in ``y`` (any type), of the images with
        weight above 0 (see ``fit``); for multi-label y,
        the column indices ``0 .. n_labels - 1``.
    multilabel_ : bool
        Whether the model was fitted on a multi-label indicator y.
    temperature_ : float
        The fitted temperature (1.0 without ``calibration``).
    unfreeze_ : int
        Number of backbone blocks trained with the head.
    weight_decay_ : float or None
        The L2 strength the full-batch linear head was fitted at: chosen by
        ``weight_decay="auto"``, or the number given; None for heads AdamW
        trains. As ``LogisticRegressionCV``'s ``C_`` and ``RidgeCV``'s ``alpha_``.
    embedder_ : ImageEmbedder
        The fitted embedder (backbone and its preprocessing).
    head_ : skorch.NeuralNetClassifier
        The trained head; ``head_.history`` holds the training curves.
    history_ : skorch.History
        Shortcut to ``head_.history``.
    n_features_in_ : int
        1: the images are one input column.
    feature_names_in_ : ndarray of shape (1,)
        The column's name, when ``fit`` was given a DataFrame with one.

    See Also
    --------
    ImageEmbedder : the feature part alone, for any scikit-learn model.
    PretrainedImageRegressor : the same with numeric targets.

    Examples
    --------
    >>> from sktransfer import PretrainedImageClassifier, load_image_folder
    >>> paths, labels = load_image_folder("sktransfer/data/trash_sample")
    >>> clf = PretrainedImageClassifier(random_state=0).fit(paths, labels)
    >>> clf.predict(paths[:2]).shape
    (2,)
    """

    _parameter_constraints = {
        **_PretrainedImageModel._parameter_constraints,
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "tta": [StrOptions(set(TTA_PRESETS)), None],
        "calibration": [StrOptions({"temperature"}), None],
    }
    _fitted_attributes = ("n_features_in_", "embedder_", "head_", "unfreeze_", "weight_decay_", "classes_",
                          "multilabel_", "temperature_")

    def __init__(self, backbone="efficientnet_lite0", weights="DEFAULT", preprocessing=None, *,
                 hidden_units=(), dropout=0.0, lr=3e-3, weight_decay="auto", max_epochs=CLASSIFIER_MAX_EPOCHS,
                 batch_size=64, optimizer=None, early_stopping=False,
                 validation_fraction=0.1, n_iter_no_change=5, class_weight=None, callbacks=None,
                 embed_batch_size=8, cache_dir=None, device="cpu", compile="auto", random_state=None, verbose=0,
                 warm_start=False, augment=None, n_views=4, unfreeze=0, backbone_lr_mult=0.1,
                 tta=None, calibration=None, engine="auto", precision="auto", **kwargs):
        self.class_weight = class_weight
        self.tta = tta
        self.calibration = calibration
        super().__init__(
            backbone, weights, preprocessing, hidden_units=hidden_units, dropout=dropout, lr=lr,
            weight_decay=weight_decay, max_epochs=max_epochs, batch_size=batch_size,
            optimizer=optimizer, early_stopping=early_stopping,
            validation_fraction=validation_fraction, n_iter_no_change=n_iter_no_change,
            callbacks=callbacks, embed_batch_size=embed_batch_size, cache_dir=cache_dir,
            device=device, compile=compile, random_state=random_state, verbose=verbose, warm_start=warm_start,
            augment=augment, n_views=n_views, unfreeze=unfreeze, backbone_lr_mult=backbone_lr_mult,
            engine=engine, precision=precision, **kwargs,
        )

    # -- fitting ---------------------------------------------------------------

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """Train the head for one epoch on a batch of images, continuing from the last call.

        ``early_stopping=True`` and ``calibration="temperature"`` are refused:
        each holds out part of the training data, which a batch cannot spare.

        Parameters
        ----------
        X : sequence of images
            Paths, encoded bytes, PIL images or HxWx3 uint8 arrays.
        y : array-like of shape (n_images,) or (n_images, n_labels)
            Labels of this batch (all among ``classes``), or a 0/1 indicator matrix.
        classes : array-like of shape (n_classes,), default=None
            Every class that any batch will have. Required on the first call
            for single-label y (a batch may miss some classes); ignored
            afterwards unless it differs from ``classes_``. For multi-label y
            the labels are the columns and ``classes`` may be left out.
        sample_weight : array-like of shape (n_images,), default=None
            Per-image weights in the loss. Images of weight 0 are left out (not
            embedded, nor counted in the feature and target statistics, the
            tuning folds or the held-out split), as if not given.

        Returns
        -------
        self
        """
        fitted = hasattr(self, "head_")
        try:
            kind = type_of_target(y, input_name="y")
        except ValueError:
            kind = None  # _check_y names what is wrong with y
        if kind != "multilabel-indicator":
            # scikit-learn's bookkeeping of classes across calls, on a stand-in so that a
            # refused call leaves the estimator as it was.
            seen = SimpleNamespace(classes_=self.classes_ if fitted else None)
            try:
                _check_partial_fit_first_call(seen, classes)
            except ValueError:
                if not fitted:
                    try:  # this batch's own labels, as an example
                        example = repr(sorted(set(np.asarray(y, dtype=object).ravel().tolist()), key=str)[:10])
                    except TypeError:  # unhashable labels: _check_y names what is wrong with y
                        example = "['daisy', 'rose', 'tulip']"
                    raise ValueError(
                        "classes is required on the first call to partial_fit: pass every class that "
                        f"any batch will have, e.g. partial_fit(X, y, classes={example}) and any others."
                    ) from None
                raise ValueError(
                    f"classes={np.asarray(classes).tolist()!r} differ from the classes of the first partial_fit "
                    f"call, {self.classes_.tolist()}; classes cannot change between calls."
                ) from None
        return self._fit(X, y, sample_weight, continuing="partial_fit" if fitted else None,
                         classes=classes, epochs=1)

    def _check_y(self, y, n):
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y, the label of each image.")
        y = column_or_1d(np.asarray(y, dtype=object) if not hasattr(y, "dtype") else y, warn=True)
        if len(y) != n:
            raise ValueError(f"X has {n} images but y has {len(y)} labels; they must match.")
        if any(_is_missing(v) for v in y):
            raise ValueError("y contains missing labels (None, NaN or pandas.NA); every image needs a label.")
        if y.dtype == object:
            # A list was read as objects so a missing label could not hide as the
            # string "nan"; labels of one kind get their natural dtype, as
            # scikit-learn's classifiers give them (classes_ of ints stay ints).
            if all(isinstance(v, (bool, np.bool_)) for v in y):
                y = y.astype(bool)
            elif all(isinstance(v, (int, np.integer)) for v in y):
                y = y.astype(np.int64)
            elif all(isinstance(v, numbers.Real) for v in y):
                y = y.astype(np.float64)  # integral values are classes; others fail the check below
            elif all(isinstance(v, str) for v in y):
                y = y.astype(str)
            elif any(isinstance(v, str) for v in y):
                kinds = sorted({type(v).__name__ for v in y})
                raise ValueError(f"y mixes labels of several types ({', '.join(kinds)}); give every image "
                                 "a label of one type (all strings, or all integers).")
        try:
            check_classification_targets(y)
        except ValueError as e:
            raise ValueError(f"y must hold class labels (str, int or bool): {e}") from None
        return y

    def _prepare_targets(self, y, n, sample_weight, *, continuing=None, classes=None):
        if isinstance(y, (list, tuple)) and any(isinstance(v, (list, tuple, set, frozenset)) for v in y):
            raise ValueError(
                "y holds a collection of labels per image; for several labels per image pass a 0/1 "
                "indicator matrix, one column per label: "
                "sklearn.preprocessing.MultiLabelBinarizer().fit_transform(y).")
        if y is not None and (sparse.issparse(y) or np.ndim(y) == 2) and np.shape(y)[1] > 1:
            return self._prepare_multilabel(y, n, sample_weight, continuing, classes)
        y = self._check_y(y, n)
        if continuing and self.multilabel_:
            raise ValueError(
                f"{continuing} continues the fitted multi-label head, which needs a 0/1 indicator y "
                f"with {len(self.classes_)} columns; got one label per image."
            )
        fresh = not continuing and classes is None  # the classes are those of y
        encoder = LabelEncoder().fit(self.classes_ if continuing else y if fresh else classes)
        unknown = set(np.unique(y).tolist()) - set(encoder.classes_.tolist())
        if unknown:
            raise ValueError(
                f"y has labels not in classes: {', '.join(sorted(map(repr, unknown)))}; the classes are "
                f"{encoder.classes_.tolist()}."
            )
        if self.class_weight == "balanced" and (continuing == "partial_fit" or classes is not None):
            raise ValueError(
                "class_weight='balanced' needs the class frequencies of all the training data, "
                "which partial_fit sees one batch at a time; pass a dict of class weights instead."
            )
        weights, weighed_by = self._sample_weights(encoder.transform(y), encoder.classes_, sample_weight, n)
        # Every label given is checked above; the classes are those of the images training
        # keeps (weight above 0), as if the others were not given.
        kept = self._kept_images(weights, weighed_by)
        y, weights = y[kept], weights[kept]
        labels = np.unique(y)
        have = f"the images {weighed_by} leaves with weight above 0 have" if len(kept) < n else "y has"
        if fresh:
            encoder = LabelEncoder().fit(labels)
        if continuing == "warm_start=True" and set(labels.tolist()) != set(encoder.classes_.tolist()):
            raise ValueError(
                f"warm_start=True continues training on the classes of the previous fit, "
                f"{encoder.classes_.tolist()}, but {have} {labels.tolist()}; set warm_start=False to fit "
                "a model on these classes."
            )
        if len(encoder.classes_) < 2:
            single = encoder.classes_.tolist()[0]
            raise ValueError(
                (f"{weighed_by} leaves images of a single class ({single!r}) with weight above 0"
                 if fresh and len(kept) < n else f"y has a single class ({single!r})")
                + "; a classifier needs at least two."
            )
        y_enc = encoder.transform(y).astype(np.int64)
        if self.class_weight == "balanced":  # the class frequencies of the images training keeps
            weights = weights * compute_class_weight("balanced", classes=encoder.classes_, y=y)[y_enc]
        fitted = {"classes_": encoder.classes_, "multilabel_": False}
        return y_enc, weights.astype(np.float32), len(encoder.classes_), fitted, kept

    def _prepare_multilabel(self, y, n, sample_weight, continuing, classes):
        Y = y.toarray() if sparse.issparse(y) else np.asarray(y)
        if len(Y) != n:
            raise ValueError(f"X has {n} images but y has {len(Y)} rows; they must match.")
        if Y.dtype.kind not in "biuf" or not np.isin(Y, (0, 1)).all():
            raise ValueError(
                f"y is 2-D with {Y.shape[1]} columns but not a 0/1 indicator matrix. For multi-label "
                "classification give one column per label, 1 where the image has it "
                "(MultiLabelBinarizer().fit_transform(label_sets) gives this); for one label per "
                "image give a 1-D y."
            )
        n_labels = Y.shape[1]
        if continuing and (not self.multilabel_ or n_labels != len(self.classes_)):
            expected = f"{len(self.classes_)} label columns" if self.multilabel_ else "one label per image"
            raise ValueError(
                f"{continuing} continues the fitted head, which was trained on {expected}; "
                f"y has {n_labels} label columns."
            )
        if classes is not None and len(classes) != n_labels:
            raise ValueError(
                f"classes has {len(classes)} entries but y has {n_labels} label columns; with "
                "multi-label y the labels are the columns, so classes can be left out."
            )
        if self.class_weight is not None:
            raise ValueError(
                f"class_weight={self.class_weight!r} applies to one label per image; with multi-label "
                "y, weigh images with sample_weight instead."
            )
        weights = _check_sample_weight(sample_weight, np.empty(n), dtype=np.float32, ensure_non_negative=True)
        kept = self._kept_images(weights, "sample_weight")
        fitted = {"classes_": np.arange(n_labels), "multilabel_": True}
        return Y[kept].astype(np.float32), weights[kept], n_labels, fitted, kept

    def _after_training(self, head):
        calibration = dict(head.callbacks_).get("calibration")
        return {"temperature_": 1.0 if calibration is None else calibration.temperature_}

    # -- the fitted state as data, for save_model / load_model ---------------------

    @staticmethod
    def _classes_from_json(values, dtype):
        """``values`` (labels read back from JSON) as an array of ``dtype``, or None when the
        cast changes one, or when they are not unique and sorted as the classes of a fit are."""
        try:
            classes = np.asarray(values, dtype=dtype)
            same = classes.ndim == 1 and classes.tolist() == values and bool(np.all(classes[1:] > classes[:-1]))
        except (ValueError, OverflowError, TypeError):
            return None
        return classes if same else None

    def _export_state(self):
        classes = self.classes_
        try:
            values = json.loads(json.dumps(classes.tolist()))
        except (TypeError, ValueError):
            raise ValueError(
                f"classes_ holds labels JSON cannot store ({classes.tolist()[:5]!r}...); "
                "use str, int, float or bool labels, or save with joblib (trusted use only)."
            ) from None
        if values != classes.tolist() or self._classes_from_json(values, classes.dtype) is None:
            raise ValueError(f"classes_ {classes.tolist()!r} do not survive a JSON round trip; use str or int labels.")
        return {
            **super()._export_state(),
            "classes.values": values,
            "classes.dtype": classes.dtype.str if classes.dtype != object else "object",
            "classes.multilabel": bool(self.multilabel_),
            "head.temperature": float(self.temperature_),
        }

    def _import_state(self, read):
        super()._import_state(read)
        n_outputs = read("head.n_outputs", int, 1)
        values = read("classes.values", list)
        if len(values) != n_outputs or not all(isinstance(v, (str, int, float, bool)) for v in values):
            raise read.invalid("classes.values", values,
                               f"{n_outputs} (head.n_outputs) labels of type str, int, float or bool")
        dtype = read("classes.dtype", str)
        try:
            ok = dtype == "object" or (np.dtype(dtype).kind in "biufU" and np.dtype(dtype).itemsize <= 4096)
        except TypeError:
            ok = False
        if not ok:
            raise read.invalid("classes.dtype", dtype, "'object' or a bool, int, float or str "
                                                       "(at most 1024 characters) dtype")
        classes = self._classes_from_json(values, object if dtype == "object" else np.dtype(dtype))
        if classes is None:
            raise read.invalid("classes.values", values,
                               f"unique, sorted labels that classes.dtype={dtype!r} holds unchanged")
        multilabel = read("classes.multilabel", bool, default=False)
        temperature = read("head.temperature", float, 1e-6, 1e6, default=1.0)
        if multilabel and temperature != 1.0:
            raise read.invalid("head.temperature", temperature,
                               "1.0 for a multi-label model (calibration is for one label per image)")
        self.classes_, self.multilabel_, self.temperature_ = classes, multilabel, temperature

    def _stand_in_target(self):
        """A target of one image and the number of outputs: what tells ``build_head`` the head's kind."""
        n_outputs = len(self.classes_)
        return (np.zeros((1, n_outputs), np.float32) if self.multilabel_ else np.zeros(1, np.int64)), n_outputs

    def _build_head(self, in_features, hidden_units, dropout):
        head = super()._build_head(in_features, hidden_units, dropout)
        if self.temperature_ != 1.0:  # what calibration set on the trained head
            head.predict_nonlinearity = _TemperatureSoftmax(self.temperature_)
        return head

    def _sample_weights(self, y_enc, classes, sample_weight, n):
        """Each image's weight: ``sample_weight`` times, for a dict ``class_weight``, its
        class's weight ("balanced" weighs the images training keeps, once they are known);
        and what gave the weights, for messages."""
        weights = _check_sample_weight(sample_weight, np.empty(n), dtype=np.float32, ensure_non_negative=True)
        if not isinstance(self.class_weight, dict):
            return weights, "sample_weight"
        unknown = set(self.class_weight) - set(classes)
        if unknown:
            raise ValueError(
                f"class_weight names classes not in y: {', '.join(sorted(map(repr, unknown)))}; "
                f"the classes are {classes.tolist()}."
            )
        per_class = compute_class_weight(self.class_weight, classes=classes, y=classes[y_enc])
        weights = weights * per_class[y_enc].astype(np.float32)
        return weights, "class_weight" if sample_weight is None else "sample_weight (with class_weight)"


    def _head_task(self, y_train, n_outputs):
        if y_train.ndim == 2:  # multi-label: one independent sigmoid output per label
            return HeadMultiLabelClassifier, dict(
                criterion=torch.nn.BCEWithLogitsLoss,
                criterion__reduction="none",
                predict_nonlinearity=torch.sigmoid,
                classes=np.arange(n_outputs),
            )
        return HeadClassifier, dict(
            criterion=torch.nn.CrossEntropyLoss,
            criterion__reduction="none",
            classes=np.arange(n_outputs),
        )

    # -- prediction ------------------------------------------------------------

    def predict_proba(self, X):
        """Class probabilities of each image, columns in the order of ``classes_``.

        For multi-label models each column is the probability of one label,
        independent of the others (rows need not sum to 1). With ``tta``, the
        average of the probabilities of each image's views.

        Returns
        -------
        proba : ndarray of shape (n_images, n_classes)
        """
        check_is_fitted(self)
        _check_columns(self, X)
        items = as_image_list(X)
        views = [None] if self.tta is None else tta_views(self.tta, self.embedder_.backbone_.preprocessing)
        features = [self._features(items, v) for v in views]  # the backbone keeps all its threads
        with limited_threads(enabled=not self.unfreeze_):
            probas = [self.head_.predict_proba({"X": Z}) for Z in features]
        proba = (probas[0] if len(probas) == 1 else np.mean(probas, axis=0)).astype(np.float64)
        if self.multilabel_:
            return proba
        return proba / proba.sum(axis=1, keepdims=True)  # exact sums after float32 softmax

    def predict(self, X):
        """Predicted class of each image (a label from ``classes_``).

        For multi-label models, a 0/1 indicator matrix of shape
        (n_images, n_labels): 1 where the label's probability is above 0.5.
        """
        proba = self.predict_proba(X)
        if self.multilabel_:
            return (proba > 0.5).astype(int)
        return self.classes_[np.argmax(proba, axis=1)]

    def score(self, X, y, sample_weight=None):
        """Accuracy on ``X`` against ``y``; labels must be classes seen in fit.

        Images whose ``sample_weight`` is 0 are left out, as in ``fit``: their
        labels may be classes the model never saw.

        For multi-label models, subset accuracy: the share of images whose
        every label is predicted right, as in scikit-learn.
        """
        check_is_fitted(self)
        if self.multilabel_:
            if np.ndim(y) != 2 or np.shape(y)[1] != len(self.classes_):
                raise ValueError(
                    f"y must be a 0/1 indicator matrix with {len(self.classes_)} columns, one per label "
                    f"the model was fitted on; got an array of shape {np.shape(y)}."
                )
            return super().score(X, y, sample_weight=sample_weight)
        if sample_weight is not None:
            # Images of weight 0 count for nothing, as in fit: their labels need not be known.
            X, y, sample_weight = _without_zero_weights(X, y, sample_weight)
        unseen = set(np.unique(np.asarray(y, dtype=object))) - set(self.classes_.tolist())
        if unseen:
            raise ValueError(
                f"y has labels never seen in fit: {', '.join(sorted(map(repr, unseen)))}; "
                f"the model knows {self.classes_.tolist()}."
            )
        return super().score(X, y, sample_weight=sample_weight)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class PretrainedImageRegressor(RegressorMixin, _PretrainedImageModel):
    """Image regressor: a frozen pretrained backbone and a new regression head trained by skorch.

    Predicts one or several numbers per image (a count, an angle, a
    brightness, a score). Embedding, caching, search and pickling behave as
    in :class:`PretrainedImageClassifier`; only the head and its loss (mean
    squared error) differ. ``score`` is R², as for scikit-learn regressors.

    Parameters
    ----------
    backbone, weights, preprocessing, cache_dir, device, compile, engine, precision
        As in :class:`ImageEmbedder`.
    hidden_units : tuple of int, default=()
        Hidden layer widths of the head; ``()`` is a linear head.
    dropout : float, default=0.0
        Dropout before each linear layer of the head. A head with dropout is
        trained by AdamW (L-BFGS's line search needs the same loss at every
        evaluation).
    lr : float, default=3e-3
        Learning rate of the head's optimizer (AdamW's; the full-batch linear
        head, see ``optimizer``, is fitted by L-BFGS with a line search and
        does not use it).
    weight_decay : float or "auto", default="auto"
        The L2 strength of the full-batch linear head (see ``optimizer``):
        its loss is the (sample-weighted) mean over images of the mean
        squared error over outputs plus ``weight_decay / 2`` times the sum of
        squared weights, ``Ridge(alpha=weight_decay * n * n_outputs / 2)`` on
        the standardised features, ``n`` being the number of images (the sum
        of the sample weights, when given). ``"auto"`` chooses it, from 10 down to 0.001
        in half decades, by the least leave-one-out error on the cached
        training features, computed in closed form by ``RidgeCV``
        (docs/accuracy.md). For the heads AdamW trains, a number is AdamW's
        (decoupled) weight decay and ``"auto"`` is 1e-4; for an ``optimizer``
        without weight decay, an L2 penalty in the loss.
    max_epochs : int, default=30
        Epochs of head training (for the full-batch linear head, L-BFGS
        steps, ending early once a step no longer lowers the loss).
    batch_size : int, default=64
        Mini-batch size of head training (the full-batch linear head takes
        all training images as one batch).
    optimizer : torch optimizer class or None, default=None
        Any of its arguments can be set as ``optimizer__<name>``. None: a
        linear head without dropout on plain features (no ``unfreeze`` or
        ``augment``), trained by ``fit`` (not ``partial_fit`` or
        ``warm_start=True``) and without ``optimizer__*`` settings, is fitted
        full batch by ``torch.optim.LBFGS`` (each epoch one L-BFGS step with
        its own line search, so ``lr`` and ``batch_size`` do not apply) to
        the optimum of its penalised loss; other heads by ``torch.optim.AdamW``.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the training data and stop when
        the validation loss has not improved for ``n_iter_no_change`` epochs,
        keeping the best epoch's weights.
    validation_fraction : float, default=0.1
        Share of the training data held out when ``early_stopping``.
    n_iter_no_change : int, default=5
        Patience of early stopping, in epochs.
    target_scaling : bool, default=True
        Train on standardised targets (each output minus its mean, divided
        by its standard deviation, in the training data) and map predictions
        back, so the learning rate suits targets of any scale.
    callbacks : list of skorch callbacks or None, default=None
        Extra skorch callbacks for the head's training.
    embed_batch_size : int, default=8
        Images per backbone forward pass.
    random_state : int, RandomState or None, default=None
        Seeds head initialisation, shuffling and the validation split.
    verbose : int, default=0
        Print skorch's epoch table and show an embedding progress bar when > 0.
    warm_start : bool, default=False
        When True, ``fit`` on a fitted model continues training its head for
        ``max_epochs`` more epochs (same number of outputs required).
    augment : {"flip", "light", "strong"}, callable or None, default=None
        Training augmentation at cached cost: each training image is embedded
        under ``n_views`` random augmentations once, and each epoch the head
        sees one view per image. ``"flip"``: horizontal flips; ``"light"``:
        random resized crops (50-100% of the area) and flips; ``"strong"``:
        crops down to 25%, flips and colour jitter. A callable is a
        torchvision transform taking and returning a PIL image (no
        ToTensor/Normalize: the weights' preprocessing follows). Views are
        seeded from ``random_state`` and cached, so grid candidates reuse them.
        Images held out for ``early_stopping`` are scored on the plain photo,
        as ``predict`` scores them.
    n_views : int, default=4
        Augmented views embedded per training image when ``augment`` is set.
    unfreeze : int, default=0
        Fine-tune the last ``unfreeze`` blocks of the backbone with the head
        (a trained copy of them is kept in the model; the shared backbone
        stays frozen). The frozen part's activations are cached, so it still
        runs once per image (per view). BatchNorm statistics in the trained
        blocks stay frozen (eval mode). Supported for EfficientNet-style and
        ResNet-style backbones.
    backbone_lr_mult : float, default=0.1
        Learning rate of the unfrozen blocks as a multiple of ``lr``.
    **kwargs
        skorch settings routed by prefix, as skorch names them:
        ``module__*``, ``criterion__*`` (e.g. ``criterion__label_smoothing``),
        ``optimizer__*``, ``iterator_train__*``, ``iterator_valid__*``,
        ``callbacks__*``, ``dataset__*``. Stored as given and checked at
        ``fit``, where a misspelt one is named with the closest setting.

    Attributes
    ----------
    n_outputs_ : int
        Number of targets per image.
    target_mean_, target_scale_ : ndarray of shape (n_outputs_,)
        The target standardisation (zeros and ones when ``target_scaling=False``).
    weight_decay_ : float or None
        The L2 strength the full-batch linear head was fitted at: chosen by
        ``weight_decay="auto"`` (``RidgeCV``'s leave-one-out), or the number
        given; None for heads AdamW trains. As ``RidgeCV``'s ``alpha_``.
    embedder_ : ImageEmbedder
        The fitted embedder (backbone and its preprocessing).
    head_ : skorch.NeuralNetRegressor
        The trained head; ``head_.history`` holds the training curves
        (losses on the standardised targets).
    history_ : skorch.History
        Shortcut to ``head_.history``.
    n_features_in_ : int
        1: the images are one input column.
    feature_names_in_ : ndarray of shape (1,)
        The column's name, when ``fit`` was given a DataFrame with one.

    See Also
    --------
    PretrainedImageClassifier : the same with class labels.
    ImageEmbedder : the feature part alone, for any scikit-learn model.

    Examples
    --------
    >>> import numpy as np
    >>> from PIL import Image
    >>> from sktransfer import PretrainedImageRegressor, load_image_folder
    >>> paths, _ = load_image_folder("sktransfer/data/trash_sample")
    >>> brightness = [np.asarray(Image.open(p).convert("L")).mean() for p in paths]
    >>> reg = PretrainedImageRegressor(random_state=0).fit(paths, brightness)
    >>> reg.predict(paths[:2]).shape
    (2,)
    """

    _parameter_constraints = {
        **_PretrainedImageModel._parameter_constraints,
        "target_scaling": ["boolean"],
    }
    _fitted_attributes = ("n_features_in_", "embedder_", "head_", "unfreeze_", "weight_decay_", "n_outputs_",
                          "target_mean_", "target_scale_", "_single_output")

    def __init__(self, backbone="efficientnet_lite0", weights="DEFAULT", preprocessing=None, *,
                 hidden_units=(), dropout=0.0, lr=3e-3, weight_decay="auto", max_epochs=30,
                 batch_size=64, optimizer=None, early_stopping=False,
                 validation_fraction=0.1, n_iter_no_change=5, target_scaling=True, callbacks=None,
                 embed_batch_size=8, cache_dir=None, device="cpu", compile="auto", random_state=None, verbose=0,
                 warm_start=False, augment=None, n_views=4, unfreeze=0, backbone_lr_mult=0.1,
                 engine="auto", precision="auto", **kwargs):
        self.target_scaling = target_scaling
        super().__init__(
            backbone, weights, preprocessing, hidden_units=hidden_units, dropout=dropout, lr=lr,
            weight_decay=weight_decay, max_epochs=max_epochs, batch_size=batch_size,
            optimizer=optimizer, early_stopping=early_stopping,
            validation_fraction=validation_fraction, n_iter_no_change=n_iter_no_change,
            callbacks=callbacks, embed_batch_size=embed_batch_size, cache_dir=cache_dir,
            device=device, compile=compile, random_state=random_state, verbose=verbose, warm_start=warm_start,
            augment=augment, n_views=n_views, unfreeze=unfreeze, backbone_lr_mult=backbone_lr_mult,
            engine=engine, precision=precision, **kwargs,
        )

    def partial_fit(self, X, y, sample_weight=None):
        """Train the head for one epoch on a batch of images, continuing from the last call.

        The first call fixes the number of outputs and, with
        ``target_scaling``, the target standardisation (from that batch).

        Returns
        -------
        self
        """
        fitted = hasattr(self, "head_")
        return self._fit(X, y, sample_weight, continuing="partial_fit" if fitted else None, epochs=1)

    def _prepare_targets(self, y, n, sample_weight, *, continuing=None, classes=None):
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y, the target value(s) of each image.")
        try:
            y = check_array(y, ensure_2d=False, dtype=np.float64, input_name="y")
        except ValueError as e:
            if "convert" not in str(e):  # not numbers; other faults (NaN, shape) read well as they are
                raise
            raise ValueError(f"y must hold numbers, the target value(s) of each image ({e}); for class "
                             "labels use PretrainedImageClassifier.") from None
        if len(y) != n:
            raise ValueError(f"X has {n} images but y has {len(y)} targets; they must match.")
        weights = _check_sample_weight(sample_weight, np.empty(n), dtype=np.float32, ensure_non_negative=True)
        kept = self._kept_images(weights, "sample_weight")
        Y, weights = y.reshape(n, -1)[kept], weights[kept]
        if continuing:
            if Y.shape[1] != self.n_outputs_:
                raise ValueError(
                    f"{continuing} continues the fitted head, which predicts {self.n_outputs_} "
                    f"output(s), but y has {Y.shape[1]}."
                )
            # The head's weights assume the first fit's target scale.
            mean, scale = self.target_mean_, self.target_scale_
        elif self.target_scaling:
            mean, scale = Y.mean(axis=0), Y.std(axis=0)
            scale[scale == 0] = 1.0
        else:
            mean, scale = np.zeros(Y.shape[1]), np.ones(Y.shape[1])
        fitted = {"n_outputs_": Y.shape[1], "target_mean_": mean, "target_scale_": scale,
                  "_single_output": y.ndim == 1}
        return ((Y - mean) / scale).astype(np.float32), weights, Y.shape[1], fitted, kept

    def _head_task(self, y_train, n_outputs):
        return HeadRegressor, dict(criterion=torch.nn.MSELoss, criterion__reduction="none")

    # -- the fitted state as data, for save_model / load_model ---------------------

    def _export_state(self):
        return {
            **super()._export_state(),
            "targets.mean": np.asarray(self.target_mean_, dtype=float).tolist(),
            "targets.scale": np.asarray(self.target_scale_, dtype=float).tolist(),
            "targets.single_output": bool(self._single_output),
        }

    def _import_state(self, read):
        super()._import_state(read)
        self.n_outputs_ = read("head.n_outputs", int, 1)
        for key, low in (("mean", None), ("scale", 1e-30)):
            values = read(f"targets.{key}", list)
            if len(values) != self.n_outputs_:
                raise read.invalid(f"targets.{key}", values, f"{self.n_outputs_} values (head.n_outputs)")
            for v in values:
                read.check(f"targets.{key}", v, float, low)
            setattr(self, f"target_{key}_", np.asarray(values, dtype=float))
        self._single_output = read("targets.single_output", bool)
        if self._single_output and self.n_outputs_ != 1:
            raise read.invalid("targets.single_output", True, f"false for {self.n_outputs_} outputs (head.n_outputs)")

    def _stand_in_target(self):
        return np.zeros((1, self.n_outputs_), np.float32), self.n_outputs_

    # -- prediction ------------------------------------------------------------

    def predict(self, X):
        """Predicted target(s) of each image.

        Returns
        -------
        y_pred : ndarray of shape (n_images,) or (n_images, n_outputs_)
            1-D when ``y`` was 1-D in fit.
        """
        check_is_fitted(self)
        _check_columns(self, X)
        Z = self._features(X)
        with limited_threads(enabled=not self.unfreeze_):
            pred = self.head_.predict({"X": Z}).astype(np.float64) * self.target_scale_ + self.target_mean_
        return pred[:, 0] if self._single_output else pred

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


def _elsewhere(cls):
    """The parameters of the other image models that ``cls`` lacks: {name: the model's class name}."""
    named = set(cls._get_param_names())
    return {name: other.__name__ for other in (PretrainedImageClassifier, PretrainedImageRegressor)
            if other is not cls for name in other._get_param_names() if name not in named}
