"""Stage 6: the scikit-learn estimators users hold.

:class:`ImageEmbedder` turns images into feature vectors with a frozen
backbone (stages 1-4). :class:`PretrainedImageClassifier` is that embedder
plus a trainable head (stage 5) trained by skorch: the same parts, composed.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, column_or_1d

from . import __version__
from ._augment import AUGMENT_PRESETS, TTA_PRESETS, augment_views, tta_views
from ._backbones import build_backbone
from ._features import extract_features
from ._head import BlocksAndHead, HeadClassifier, HeadModule, feature_statistics, pooled_features
from ._inputs import as_image_list

_HEAD_PREFIXES = ("optimizer__", "iterator_train__", "iterator_valid__", "callbacks__")


class _VersionedMixin:
    """Refuse to unpickle a model saved by an incompatible sktransfer release."""

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
        if hasattr(super(), "__setstate__"):
            super().__setstate__(state)
        else:
            self.__dict__.update(state)


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


class ImageEmbedder(_VersionedMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
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
        initialisation.
    preprocessing : dict or None, default=None
        Override the weights' preprocessing with keys ``resize_size``,
        ``crop_size``, ``interpolation``, ``mean``, ``std``.
    batch_size : int, default=32
        Images per backbone forward pass.
    cache_dir : str, path-like or None, default=None
        Folder of a disk feature cache shared across processes and sessions.
    device : str, default="cpu"
        Torch device of the backbone (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    verbose : int, default=0
        Show a progress bar while embedding when > 0.

    Attributes
    ----------
    backbone_ : Backbone
        The frozen body with its preprocessing and fingerprint.
    n_features_out_ : int
        Length of the feature vectors.

    See Also
    --------
    PretrainedImageClassifier : this embedder plus a trained head.

    Examples
    --------
    >>> from sktransfer import ImageEmbedder, load_image_folder
    >>> paths, labels = load_image_folder("sktransfer/data/flowers_sample")
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
        "verbose": ["verbose"],
    }

    def __init__(self, backbone="efficientnet_lite0", weights="DEFAULT", preprocessing=None,
                 batch_size=32, cache_dir=None, device="cpu", verbose=0):
        self.backbone = backbone
        self.weights = weights
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.device = device
        self.verbose = verbose

    def fit(self, X=None, y=None):
        """Load the backbone. ``X`` is checked but not embedded (nothing is learned)."""
        self._validate_params()
        if X is not None:
            as_image_list(X)
        _check_device(self.device)
        self.backbone_ = build_backbone(self.backbone, self.weights, self.preprocessing)
        self.n_features_out_ = self.backbone_.num_features
        return self

    def transform(self, X):
        """Feature vectors of the images in ``X``.

        Returns
        -------
        features : ndarray of shape (n_images, n_features_out_), float32
        """
        check_is_fitted(self, "backbone_")
        items = as_image_list(X)
        return extract_features(
            items,
            self.backbone_,
            batch_size=self.batch_size,
            cache_dir=self.cache_dir,
            device=_check_device(self.device, fitted=True),
            progress=self.verbose > 0,
        )

    @property
    def _n_features_out(self):
        return self.n_features_out_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = True
        return tags


class _TemperatureSoftmax:
    """skorch's predict nonlinearity with calibrated logits: softmax(logits / temperature)."""

    def __init__(self, temperature):
        self.temperature = float(temperature)

    def __call__(self, logits):
        return torch.softmax(logits / self.temperature, dim=-1)


@contextlib.contextmanager
def _seeded(random_state, device):
    """Run with torch's RNG seeded from ``random_state``, restoring it afterwards."""
    if random_state is None:
        yield
        return
    seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class PretrainedImageClassifier(_VersionedMixin, ClassifierMixin, BaseEstimator):
    """Image classifier: a frozen pretrained backbone and a new head trained by skorch.

    ``fit``, ``predict``, ``predict_proba`` and ``score`` take images (paths,
    bytes, PIL images or uint8 arrays) and work in Pipelines, GridSearchCV
    and cross-validation. The backbone runs once per image: features are
    cached by content (see :class:`ImageEmbedder`), so every epoch, fold and
    grid candidate after the first reuses them; only the head trains.

    Parameters
    ----------
    backbone, weights, preprocessing, cache_dir, device
        As in :class:`ImageEmbedder`.
    hidden_units : tuple of int, default=()
        Hidden layer widths of the head; ``()`` is a linear head.
    dropout : float, default=0.0
        Dropout before each linear layer of the head.
    lr : float, default=3e-3
        Learning rate of the head's optimizer.
    weight_decay : float, default=1e-4
        Weight decay of the head's optimizer.
    max_epochs : int, default=50
        Epochs of head training.
    batch_size : int, default=32
        Mini-batch size of head training.
    optimizer : torch optimizer class, default=torch.optim.AdamW
        Any of its arguments can be set as ``optimizer__<name>``.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the training data (stratified) and
        stop when the validation loss has not improved for
        ``n_iter_no_change`` epochs, keeping the best epoch's weights.
    validation_fraction : float, default=0.1
        Share of the training data held out when ``early_stopping``.
    n_iter_no_change : int, default=5
        Patience of early stopping, in epochs.
    class_weight : dict, "balanced" or None, default=None
        Weights of the classes in the loss, as in scikit-learn.
    callbacks : list of skorch callbacks or None, default=None
        Extra skorch callbacks for the head's training.
    embed_batch_size : int, default=32
        Images per backbone forward pass.
    random_state : int, RandomState or None, default=None
        Seeds head initialisation, shuffling and the validation split, so
        equal seeds give equal models.
    verbose : int, default=0
        Print skorch's epoch table and show an embedding progress bar when > 0.
    augment : {"flip", "light", "strong"}, callable or None, default=None
        Training augmentation at cached cost: each training image is embedded
        under ``n_views`` random augmentations once, and each epoch the head
        sees one view per image. ``"flip"``: horizontal flips; ``"light"``:
        random resized crops (50-100% of the area) and flips; ``"strong"``:
        crops down to 25%, flips and colour jitter. A callable is a
        torchvision transform taking and returning a PIL image (no
        ToTensor/Normalize: the weights' preprocessing follows). Views are
        seeded from ``random_state`` and cached, so grid candidates reuse them.
    n_views : int, default=4
        Augmented views embedded per training image when ``augment`` is set.
    tta : {"flip", "flip+shift"} or None, default=None
        Test-time augmentation: ``predict_proba`` averages the probabilities
        of the plain image and its mirror image (``"flip"``), plus four
        views shifted towards the corners (``"flip+shift"``). ``predict`` and
        ``score`` follow ``predict_proba``.
    unfreeze : int, default=0
        Fine-tune the last ``unfreeze`` blocks of the backbone with the head
        (a trained copy of them is kept in the model; the shared backbone
        stays frozen). The frozen part's activations are cached, so it still
        runs once per image (per view). BatchNorm statistics in the trained
        blocks stay frozen (eval mode). Supported for EfficientNet-style and
        ResNet-style backbones.
    backbone_lr_mult : float, default=0.1
        Learning rate of the unfrozen blocks as a multiple of ``lr``.
    calibration : {"temperature"} or None, default=None
        Hold out ``validation_fraction`` of the training data (stratified;
        the early-stopping split when ``early_stopping``) and fit a
        temperature on it that divides the logits, so that probabilities are
        calibrated; predictions (the argmax) do not change.
    **kwargs
        skorch settings routed by prefix: ``optimizer__*``,
        ``iterator_train__*``, ``iterator_valid__*``, ``callbacks__*``.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The class labels, as given in ``y`` (any type).
    embedder_ : ImageEmbedder
        The fitted embedder (backbone and its preprocessing).
    head_ : skorch.NeuralNetClassifier
        The trained head; ``head_.history`` holds the training curves.
    history_ : skorch.History
        Shortcut to ``head_.history``.
    temperature_ : float
        The fitted temperature (1.0 without ``calibration``).

    See Also
    --------
    ImageEmbedder : the feature part alone, for any scikit-learn model.

    Examples
    --------
    >>> from sktransfer import PretrainedImageClassifier, load_image_folder
    >>> paths, labels = load_image_folder("sktransfer/data/flowers_sample")
    >>> clf = PretrainedImageClassifier(random_state=0).fit(paths, labels)
    >>> clf.predict(paths[:2]).shape
    (2,)
    """

    _parameter_constraints = {
        **ImageEmbedder._parameter_constraints,
        "hidden_units": [tuple, list],
        "dropout": [Interval(numbers.Real, 0, 1, closed="left")],
        "lr": [Interval(numbers.Real, 0, None, closed="neither")],
        "weight_decay": [Interval(numbers.Real, 0, None, closed="left")],
        "max_epochs": [Interval(numbers.Integral, 1, None, closed="left")],
        "optimizer": [type],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "n_iter_no_change": [Interval(numbers.Integral, 1, None, closed="left")],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "callbacks": [list, None],
        "embed_batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "augment": [StrOptions(set(AUGMENT_PRESETS)), callable, None],
        "n_views": [Interval(numbers.Integral, 1, None, closed="left")],
        "tta": [StrOptions(set(TTA_PRESETS)), None],
        "unfreeze": [Interval(numbers.Integral, 0, None, closed="left")],
        "backbone_lr_mult": [Interval(numbers.Real, 0, None, closed="neither")],
        "calibration": [StrOptions({"temperature"}), None],
    }

    def __init__(self, backbone="efficientnet_lite0", weights="DEFAULT", preprocessing=None, *,
                 hidden_units=(), dropout=0.0, lr=3e-3, weight_decay=1e-4, max_epochs=50,
                 batch_size=32, optimizer=torch.optim.AdamW, early_stopping=False,
                 validation_fraction=0.1, n_iter_no_change=5, class_weight=None, callbacks=None,
                 embed_batch_size=32, cache_dir=None, device="cpu", random_state=None, verbose=0,
                 augment=None, n_views=4, tta=None, unfreeze=0, backbone_lr_mult=0.1,
                 calibration=None, **kwargs):
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
        self.class_weight = class_weight
        self.callbacks = callbacks
        self.embed_batch_size = embed_batch_size
        self.cache_dir = cache_dir
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.augment = augment
        self.n_views = n_views
        self.tta = tta
        self.unfreeze = unfreeze
        self.backbone_lr_mult = backbone_lr_mult
        self.calibration = calibration
        for key, value in kwargs.items():
            if not key.startswith(_HEAD_PREFIXES):
                raise TypeError(
                    f"{type(self).__name__} got an unexpected keyword argument {key!r}; "
                    f"skorch settings are passed with a prefix: {', '.join(p + '*' for p in _HEAD_PREFIXES)}."
                )
            setattr(self, key, value)

    # -- parameters routed to skorch by prefix, as skorch itself does ---------

    def _head_kwargs(self):
        return {k: v for k, v in vars(self).items() if k.startswith(_HEAD_PREFIXES)}

    def get_params(self, deep=True):
        params = super().get_params(deep=deep)
        params.update(self._head_kwargs())
        return params

    def set_params(self, **params):
        routed = {k: v for k, v in params.items() if k.startswith(_HEAD_PREFIXES)}
        for key, value in routed.items():
            setattr(self, key, value)
        super().set_params(**{k: v for k, v in params.items() if k not in routed})
        return self

    # -- fitting ---------------------------------------------------------------

    def _make_embedder(self):
        return ImageEmbedder(
            backbone=self.backbone, weights=self.weights, preprocessing=self.preprocessing,
            batch_size=self.embed_batch_size, cache_dir=self.cache_dir, device=self.device,
            verbose=self.verbose,
        )

    def _check_hidden_units(self):
        units = self.hidden_units
        if not all(isinstance(u, numbers.Integral) and u > 0 for u in units):
            raise ValueError(
                f"hidden_units={units!r} must be a tuple of positive integers, "
                "e.g. () for a linear head or (256,) for one hidden layer."
            )
        return tuple(int(u) for u in units)

    def _check_y(self, y, n):
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y, the label of each image.")
        y = column_or_1d(np.asarray(y, dtype=object) if not hasattr(y, "dtype") else y, warn=True)
        if len(y) != n:
            raise ValueError(f"X has {n} images but y has {len(y)} labels; they must match.")
        if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in y):
            raise ValueError("y contains missing labels (None or NaN); every image needs a label.")
        check_classification_targets(y)
        return y

    def fit(self, X, y, sample_weight=None):
        """Embed the images (once; cached) and train the head.

        Parameters
        ----------
        X : sequence of images
            Paths, encoded bytes, PIL images or HxWx3 uint8 arrays.
        y : array-like of shape (n_images,)
            Class labels of any type.
        sample_weight : array-like of shape (n_images,), default=None
            Per-image weights in the loss (multiplied by ``class_weight``).

        Returns
        -------
        self
        """
        self._validate_params()
        hidden_units = self._check_hidden_units()
        items = as_image_list(X)
        y = self._check_y(y, len(items))
        encoder = LabelEncoder().fit(y)
        if len(encoder.classes_) < 2:
            raise ValueError(
                f"y has a single class ({encoder.classes_[0]!r}); a classifier needs at least two."
            )
        y_enc = encoder.transform(y).astype(np.int64)
        weights = self._sample_weights(y_enc, encoder.classes_, sample_weight, len(items))
        device = _check_device(self.device)

        embedder = self._make_embedder().fit()
        if self.unfreeze:
            embedder.backbone_.prefix(self.unfreeze)  # an unsupported split fails before embedding
        if self.augment is None:
            Z = self._embed(embedder, items, None, self.unfreeze)
        else:
            # One backbone pass per image and view, cached: shape (n_images, n_views, n_features).
            views = augment_views(self.augment, self.n_views, self._view_seed(),
                                  embedder.backbone_.preprocessing)
            Z = np.stack([self._embed(embedder, items, v, self.unfreeze) for v in views], axis=1)
        head = self._build_head(Z, len(encoder.classes_), hidden_units, device, embedder.backbone_)
        with _seeded(self.random_state, device):
            head.fit({"X": Z, "sample_weight": weights}, y_enc)
        temperature = 1.0
        if self.calibration == "temperature":
            temperature = self._fit_temperature(head, Z, y_enc)
            head.predict_nonlinearity = _TemperatureSoftmax(temperature)
        # Fitted state is assigned together at the end: an interrupted fit
        # leaves the estimator as it was before.
        self.classes_ = encoder.classes_
        self.embedder_ = embedder
        self.head_ = head
        self.unfreeze_ = int(self.unfreeze)
        self.temperature_ = temperature
        return self

    def _embed(self, embedder, items, view=None, unfreeze=0):
        """Features of ``items`` (boundary activations when fine-tuning), under ``view``."""
        if view is None and not unfreeze:
            return embedder.transform(items)
        backbone = embedder.backbone_.prefix(unfreeze) if unfreeze else embedder.backbone_
        return extract_features(
            items, backbone, batch_size=embedder.batch_size, cache_dir=embedder.cache_dir,
            device=_check_device(embedder.device, fitted=True), progress=embedder.verbose > 0,
            view=view,
        )

    def _view_seed(self):
        # A fixed random_state fixes the views, so every grid candidate reuses the cached ones.
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _fit_temperature(self, head, Z, y_enc):
        """The temperature minimising the log loss on the held-out split."""
        dataset = head.get_dataset({"X": Z}, y_enc)
        _, valid = head.train_split(dataset, y_enc)
        logits = head.forward(torch.utils.data.Subset(dataset, valid.indices), training=False)
        logits = logits.detach().cpu().double().numpy()
        y_valid = y_enc[np.asarray(valid.indices)]
        candidates = np.exp(np.linspace(np.log(0.05), np.log(20.0), 401))
        losses = []
        for t in candidates:
            z = logits / t
            z = z - z.max(axis=1, keepdims=True)
            log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            losses.append(-log_p[np.arange(len(y_valid)), y_valid].mean())
        return float(candidates[int(np.argmin(losses))])

    def _sample_weights(self, y_enc, classes, sample_weight, n):
        from sklearn.utils.class_weight import compute_class_weight

        weights = _check_sample_weight(sample_weight, np.empty(n), dtype=np.float32)
        if self.class_weight is not None:
            if isinstance(self.class_weight, dict):
                unknown = set(self.class_weight) - set(classes)
                if unknown:
                    raise ValueError(
                        f"class_weight names classes not in y: {sorted(map(repr, unknown))}; "
                        f"the classes are {list(classes)}."
                    )
            per_class = compute_class_weight(self.class_weight, classes=classes, y=classes[y_enc])
            weights = weights * per_class[y_enc].astype(np.float32)
        return weights.astype(np.float32)

    def _build_head(self, Z, n_classes, hidden_units, device, backbone=None):
        from skorch.callbacks import EarlyStopping
        from skorch.dataset import ValidSplit

        tuned = {}
        if self.unfreeze:
            blocks = backbone.blocks(self.unfreeze)
            shape = backbone.prefix(self.unfreeze).shape
            flat = Z.reshape(-1, Z.shape[-1])
            with torch.inference_mode():  # the head standardises the blocks' initial output
                pooled = [pooled_features(blocks, shape, torch.from_numpy(flat[k:k + 64]))
                          for k in range(0, len(flat), 64)]
            features = torch.cat(pooled).numpy()
            tuned = dict(module__blocks=blocks, module__shape=shape)
            if "optimizer__param_groups" not in self._head_kwargs():
                tuned["optimizer__param_groups"] = [("blocks.*", {"lr": self.lr * self.backbone_lr_mult})]
        else:
            features = Z.reshape(-1, Z.shape[-1]) if Z.ndim == 3 else Z
        mean, scale = feature_statistics(features)
        callbacks = list(self.callbacks or [])
        train_split = None
        if self.early_stopping:
            train_split = ValidSplit(self.validation_fraction, stratified=True, random_state=self._split_seed())
            callbacks.append(("early_stopping", EarlyStopping(patience=self.n_iter_no_change, load_best=True)))
        if self.calibration is not None:
            # The temperature is fitted on this split after training, so it needs a fixed seed.
            seed = self._split_seed()
            seed = np.random.randint(np.iinfo(np.int32).max) if seed is None else seed
            train_split = ValidSplit(self.validation_fraction, stratified=True, random_state=seed)
        return HeadClassifier(
            module=BlocksAndHead if self.unfreeze else HeadModule,
            **tuned,
            module__in_features=features.shape[1],
            module__n_outputs=n_classes,
            module__hidden_units=hidden_units,
            module__dropout=self.dropout,
            module__mean=mean,
            module__scale=scale,
            criterion=torch.nn.CrossEntropyLoss,
            criterion__reduction="none",
            optimizer=self.optimizer,
            optimizer__weight_decay=self.weight_decay,
            lr=self.lr,
            max_epochs=self.max_epochs,
            batch_size=self.batch_size,
            train_split=train_split,
            callbacks=callbacks,
            classes=np.arange(n_classes),
            iterator_train__shuffle=True,
            device=device,
            verbose=self.verbose,
            **self._head_kwargs(),
        )

    def _split_seed(self):
        if self.random_state is None:
            return None
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    # -- prediction ------------------------------------------------------------

    @property
    def history_(self):
        check_is_fitted(self, "head_")
        return self.head_.history

    def _features(self, X, view=None):
        check_is_fitted(self, "head_")
        return self._embed(self.embedder_, as_image_list(X), view, getattr(self, "unfreeze_", 0))

    def predict_proba(self, X):
        """Class probabilities of each image, columns in the order of ``classes_``.

        With ``tta``, the average of the probabilities of each image's views.

        Returns
        -------
        proba : ndarray of shape (n_images, n_classes)
        """
        check_is_fitted(self, "head_")
        items = as_image_list(X)
        views = [None] if self.tta is None else tta_views(self.tta, self.embedder_.backbone_.preprocessing)
        self.head_.set_params(device=_check_device(self.head_.device, fitted=True))
        probas = [self.head_.predict_proba({"X": self._features(items, v)}) for v in views]
        proba = (probas[0] if len(probas) == 1 else np.mean(probas, axis=0)).astype(np.float64)
        return proba / proba.sum(axis=1, keepdims=True)  # exact sums after float32 softmax

    def predict(self, X):
        """Predicted class of each image (a label from ``classes_``)."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def score(self, X, y, sample_weight=None):
        """Accuracy on ``X`` against ``y``; labels must be classes seen in fit."""
        check_is_fitted(self, "head_")
        unseen = set(np.unique(np.asarray(y, dtype=object))) - set(self.classes_.tolist())
        if unseen:
            raise ValueError(
                f"y has labels never seen in fit: {sorted(map(repr, unseen))}; "
                f"the model knows {list(self.classes_)}."
            )
        return super().score(X, y, sample_weight=sample_weight)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags
