"""Stage 5: the trainable head on top of the features.

A small network (linear, or an MLP with ``hidden_units``) whose first step
standardises the features with statistics of the training set, trained by
skorch. Only this part learns; the backbone stays frozen.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import warnings

import numpy as np
import torch
from skorch import NeuralNet, NeuralNetClassifier, NeuralNetRegressor
from skorch.callbacks import Callback, EarlyStopping
from skorch.dataset import Dataset, ValidSplit, unpack_data
from skorch.utils import to_tensor
from torch import nn

from ._backbones import pool
from ._inputs import _count
from ._runtime import one_blas_thread

#: Prefixes of the skorch settings the estimators pass on to the head:
#: skorch's ``NeuralNet.prefixes_`` and the three it adds when it initialises
#: a net. ``compile__`` is not among them: the estimators' ``compile`` is the
#: backbone's.
HEAD_PREFIXES = tuple(
    p + "__" for p in (*NeuralNet.prefixes_, "module", "criterion", "optimizer") if p != "compile"
)


class HeadModule(nn.Module):
    """Standardise the features, then a linear layer or an MLP.

    Parameters
    ----------
    in_features : int
        Length of the feature vectors.
    n_outputs : int
        Number of classes (logits) or regression targets.
    hidden_units : tuple of int, default=()
        Width of each hidden layer; empty for a linear head.
    dropout : float, default=0.0
        Dropout probability before each linear layer.
    mean, scale : array-like of shape (in_features,), default=None
        Standardisation statistics; zeros and ones when None.
    """

    def __init__(self, in_features, n_outputs, hidden_units=(), dropout=0.0, mean=None, scale=None):
        super().__init__()
        mean = torch.zeros(in_features) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        scale = torch.ones(in_features) if scale is None else torch.as_tensor(scale, dtype=torch.float32)
        self.register_buffer("mean", mean.clone())
        self.register_buffer("scale", scale.clone())
        layers = []
        width = in_features
        for units in hidden_units:
            layers += [nn.Dropout(dropout), nn.Linear(width, int(units)), nn.ReLU()]
            width = int(units)
        layers += [nn.Dropout(dropout), nn.Linear(width, n_outputs)]
        self.layers = nn.Sequential(*layers)

    def forward(self, X, sample_weight=None, X_eval=None):
        # sample_weight rides along in skorch's batches; the loss uses it (below).
        X, n_views = pick_view(eval_features(X, X_eval, self.training), self.training)
        out = self.layers((X - self.mean) / self.scale)
        return out if n_views is None else out.view(-1, n_views, out.shape[-1]).mean(dim=1)


def eval_features(X, X_eval, training):
    """What the head sees of a batch: ``X``, or out of training ``X_eval`` where given.

    A fit on augmented views also hands over each image's plain features as
    ``X_eval``: the held-out images (early stopping's validation loss, the
    calibration temperature) are then scored as ``predict`` scores them.
    """
    return X if training or X_eval is None else X_eval


def pick_view(X, training):
    """Features of shape (batch, n_views, ...) hold several augmented views per image.

    In training, one view per image is drawn each time the image is seen
    (so each epoch sees one view of each image); otherwise every view is
    kept, flattened into the batch, and the caller averages the logits.
    Returns ``(X, n_views)`` with ``n_views`` None for plain features.
    """
    if X.ndim != 3:
        return X, None
    if training:
        choice = torch.randint(X.shape[1], (X.shape[0],), device=X.device)
        return X[torch.arange(X.shape[0], device=X.device), choice], None
    return X.reshape(-1, X.shape[-1]), X.shape[1]


def pooled_features(blocks, shape, X):
    """Pooled features of flattened boundary activations ``X``, as the backbone body gives."""
    x = X.reshape(-1, *shape).contiguous(memory_format=torch.channels_last)
    return pool(blocks(x))


class BlocksAndHead(nn.Module):
    """Fine-tuning: the last blocks of the backbone, average pooling, then the head.

    Inputs are the frozen part's activations, flattened (cached like features).
    BatchNorm layers in ``blocks`` stay in eval mode during training: their
    running statistics are the pretrained ones and are not updated, a
    deliberate choice for small training sets (batch statistics of a few
    dozen images are noisy and would drift away from what the later layers
    expect); their affine weights do train.

    Parameters
    ----------
    blocks : torch.nn.Module
        The trainable blocks (a copy; the shared backbone is not touched).
    shape : tuple of int
        Activation shape of one image at the boundary, e.g. ``(192, 7, 7)``.
    in_features, n_outputs, hidden_units, dropout, mean, scale
        As in :class:`HeadModule`.
    """

    def __init__(self, blocks, shape, in_features, n_outputs, hidden_units=(), dropout=0.0,
                 mean=None, scale=None):
        super().__init__()
        self.blocks = blocks
        self.shape = tuple(shape)
        self.head = HeadModule(in_features, n_outputs, hidden_units, dropout, mean, scale)

    def train(self, mode=True):
        super().train(mode)
        for module in self.blocks.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def features(self, X):
        return pooled_features(self.blocks, self.shape, X)

    def forward(self, X, sample_weight=None, X_eval=None):
        X, n_views = pick_view(eval_features(X, X_eval, self.training), self.training)
        out = self.head(self.features(X))
        return out if n_views is None else out.view(-1, n_views, out.shape[-1]).mean(dim=1)


class FeatureLoader:
    """Mini-batches of in-memory features for skorch, one array slice per batch.

    Used as skorch's ``iterator_train``/``iterator_valid``. The features are
    already computed, so a batch is a slice of whole arrays rather than
    skorch's per-sample ``Dataset.__getitem__`` and collation, which would
    cost more than the head's own arithmetic. Shuffling draws from torch's
    global generator, so ``random_state`` still decides the order.
    """

    #: DataLoader settings that mean something for in-memory features.
    SUPPORTED = ("batch_size", "shuffle", "drop_last")

    def __init__(self, dataset, batch_size=32, shuffle=False, drop_last=False):
        indices = None
        if isinstance(dataset, torch.utils.data.Subset):  # a validation split
            indices = torch.as_tensor(np.asarray(dataset.indices), dtype=torch.long)
            dataset = dataset.dataset
        X, y = dataset.X, dataset.y

        def tensor(a):
            t = torch.as_tensor(np.asarray(a))
            return t if indices is None else t[indices]

        self.X = {k: tensor(v) for k, v in X.items() if v is not None} if isinstance(X, dict) else tensor(X)
        self.y = None if y is None else tensor(y)
        first = next(iter(self.X.values())) if isinstance(self.X, dict) else self.X
        self.n = len(first)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last

    def __len__(self):
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        X, y = self.X, self.y
        if self.shuffle:  # one gather per epoch; the batches are then views of it
            order = torch.randperm(self.n)
            X = {k: v[order] for k, v in X.items()} if isinstance(X, dict) else X[order]
            y = None if y is None else y[order]
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            end = min(start + self.batch_size, self.n)
            Xb = {k: v[start:end] for k, v in X.items()} if isinstance(X, dict) else X[start:end]
            yield Xb, (y[start:end] if y is not None else torch.zeros(end - start))


def weighted_loss(criterion, y_pred, y_true, weights=None):
    """Mean of per-sample losses (``criterion`` built with ``reduction="none"``), weighted when given."""
    losses = criterion(y_pred, y_true)
    if losses.ndim > 1:  # one loss per output (multi-label, multi-output)
        losses = losses.mean(dim=tuple(range(1, losses.ndim)))
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum()


def l2_penalty(module):
    """Half the sum of squares of the weights of the linear layers (not their biases)."""
    return 0.5 * sum(m.weight.pow(2).sum() for m in module.modules() if isinstance(m, nn.Linear))


def linear_loss(layer, X, loss_fn, l2, mean=None, scale=None):
    """The penalised loss of the linear ``layer`` on features ``X`` standardised by
    ``mean`` and ``scale`` (``X`` already standardised when they are None), with
    its gradient stored in the layer's ``.grad``: one evaluation for L-BFGS.

    ``loss_fn`` maps the ``(n, outputs)`` logits to the unpenalised loss;
    ``l2`` times :func:`l2_penalty` of the layer is added. With
    ``weighted_loss`` as ``loss_fn`` this is the value and gradient of
    autograd through :class:`HeadModule` and :meth:`WeightedLossMixin.get_loss`,
    at a fraction of the cost on a full batch: the standardisation is folded
    into the weights, so no standardised copy of ``X`` is made at each
    evaluation, and both products over ``X`` (the logits, and the weights'
    gradient) read it in the order BLAS is fastest at for a few outputs.
    Autograd runs on the logits only, so any criterion works. Folding costs
    float32 precision when the features' means are far larger than their
    spread (a relative error of about 1e-3 on the bias gradient for an
    offset of 50 standard deviations); pooled backbone features are not so.

    Returns
    -------
    loss : Tensor
        The penalised loss, a detached scalar.
    logits : Tensor
        The outputs, ``(n, outputs)``.
    """
    W, b = layer.weight, layer.bias
    with torch.no_grad():
        # (X - mean) / scale @ W.T + b  ==  X @ A.T + c
        A, c = (W, b) if mean is None else (W / scale, b - (W / scale) @ mean)
        logits = torch.mm(A, X.t()).t().add_(c)
    logits.requires_grad_(True)
    loss = loss_fn(logits)
    (G,) = torch.autograd.grad(loss, logits)
    with torch.no_grad():
        grad_A, grad_c = torch.mm(G.t(), X), G.sum(0)
        grad_W = grad_A if mean is None else (grad_A - torch.outer(grad_c, mean)) / scale
        W.grad = grad_W.add_(W, alpha=l2) if l2 else grad_W
        b.grad = grad_c
        return loss.detach() + l2 * 0.5 * W.pow(2).sum(), logits.detach()


class WeightedLossMixin:
    """For a skorch net: a loss averaged with per-sample weights, plus an L2 penalty.

    Batches are ``{"X": features, "sample_weight": w}``; the criterion must be
    built with ``reduction="none"``. ``l2`` multiplies :func:`l2_penalty` of
    the module in training (the full-batch linear head's strength: tuned for
    ``weight_decay="auto"``, the number given otherwise).
    """

    def __init__(self, *args, l2=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.l2 = l2

    def get_loss(self, y_pred, y_true, X=None, training=False):
        weights = X.get("sample_weight") if isinstance(X, dict) else None
        if weights is not None:
            weights = to_tensor(weights, device=self.device)
        loss = weighted_loss(self.criterion_, y_pred, to_tensor(y_true, device=self.device), weights)
        if training and self.l2:
            loss = loss + self.l2 * l2_penalty(self.module_)
        return loss

    def train_step_single(self, batch, **fit_params):
        """One evaluation of the loss and its gradient: by :func:`linear_loss` for a
        linear :class:`HeadModule` without dropout under L-BFGS, where the same full
        batch is evaluated many times; by skorch's forward and backward otherwise."""
        module = self.module_
        Xi, yi = unpack_data(batch)
        X = Xi.get("X") if isinstance(Xi, dict) else None
        plain = (isinstance(self.optimizer_, torch.optim.LBFGS) and type(module) is HeadModule
                 and len(module.layers) == 2 and module.layers[0].p == 0 and not fit_params
                 and X is not None and X.ndim == 2)
        if not plain:
            return super().train_step_single(batch, **fit_params)
        self._set_training(True)
        weights = Xi.get("sample_weight")
        y = to_tensor(yi, device=self.device)
        weights = None if weights is None else to_tensor(weights, device=self.device)
        loss, logits = linear_loss(module.layers[-1], to_tensor(X, device=self.device),
                                   lambda z: weighted_loss(self.criterion_, z, y, weights),
                                   self.l2, module.mean, module.scale)
        return {"loss": loss, "y_pred": logits}


class InterruptionMixin:
    """For a skorch net: remember a KeyboardInterrupt that skorch swallows.

    skorch ends ``fit`` quietly on KeyboardInterrupt because its
    ``EarlyStopping`` stops training that way. Any other interrupt (Ctrl-C, a
    callback raising it) sets ``interrupted_``, so the estimator can refuse to
    keep a half-trained head.
    """

    def fit_loop(self, X, y=None, **fit_params):
        self.interrupted_ = False
        try:
            return super().fit_loop(X, y, **fit_params)
        except KeyboardInterrupt:
            self.interrupted_ = not _stopped_early(self)
            raise


def _stopped_early(net):
    return any((isinstance(cb, EarlyStopping) and cb.misses_ >= cb.patience)
               or (isinstance(cb, Converged) and cb.converged_)
               for _, cb in getattr(net, "callbacks_", []))


class Converged(Callback):
    """End a full-batch L-BFGS fit once an epoch lowers the training loss by no more
    than ``tolerance``: each later epoch would start from the same point and repeat
    the same step. Stops as skorch's ``EarlyStopping`` does (a KeyboardInterrupt
    that ``fit`` takes as the normal end).

    Attributes
    ----------
    converged_ : bool
        Whether training ended here, before ``max_epochs``.
    """

    def __init__(self, tolerance, sink=print):
        self.tolerance = tolerance
        self.sink = sink

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        self.converged_ = False

    def on_epoch_end(self, net, **kwargs):
        losses = net.history[-2:, "train_loss"]
        if len(losses) == 2 and losses[0] - losses[1] <= self.tolerance:
            self.converged_ = True
            if net.verbose:  # as skorch's EarlyStopping says why it stops
                self.sink(f"Stopping: the L-BFGS step of epoch {len(net.history) - 1} lowered the training "
                          f"loss by no more than {self.tolerance:g}.")
            raise KeyboardInterrupt


class HeadClassifier(InterruptionMixin, WeightedLossMixin, NeuralNetClassifier):
    """skorch's NeuralNetClassifier with a sample-weighted loss."""


class HeadMultiLabelClassifier(HeadClassifier):
    """HeadClassifier for multi-label targets (one sigmoid output per label).

    ``predict`` gives the 0/1 indicator matrix (probability above 0.5), so
    skorch's validation accuracy during early stopping is subset accuracy.
    """

    def predict(self, X):
        return (self.predict_proba(X) > 0.5).astype(int)


class HeadRegressor(InterruptionMixin, WeightedLossMixin, NeuralNetRegressor):
    """skorch's NeuralNetRegressor with a sample-weighted loss.

    Targets are 2-D ``(n_samples, n_outputs)`` float32; the criterion (MSE)
    is built with ``reduction="none"``.
    """


def feature_statistics(Z):
    """Per-feature mean and one common scale: the standard deviation of all feature values.

    One scale for all features, not one per feature: pooled backbone features
    have many near-constant dimensions on a small training set, and dividing
    by their tiny deviations turns slight differences on new images into huge
    inputs (on 30 sign-digit photos, held-out R² went from -180 to 0.68 and
    accuracy from 0.60 to 0.85 with one common scale).
    """
    mean = Z.mean(axis=0)
    spread = float(Z.std())
    scale = np.full(Z.shape[1], spread if spread > 0 else 1.0, dtype=Z.dtype)
    return mean, scale


# -- calibration -------------------------------------------------------------------


class TemperatureSoftmax:
    """skorch's predict nonlinearity with calibrated logits: softmax(logits / temperature)."""

    def __init__(self, temperature):
        self.temperature = float(temperature)

    def __call__(self, logits):
        return torch.softmax(logits / self.temperature, dim=-1)


#: Spread of the prior on log(temperature) (normal, centred on 1): see :func:`fit_temperature`.
TEMPERATURE_PRIOR_STD = 0.25


def fit_temperature(logits, y, weights=None, prior_std=TEMPERATURE_PRIOR_STD):
    """The temperature ``T`` of ``softmax(logits / T)`` that best explains the labels ``y``.

    The log loss over the images (weighted by ``weights``, scaled to sum to the
    number of images, so weights scaled alike change nothing), plus a normal prior
    on ``log(T)`` centred on 0 with ``prior_std``: the most probable temperature
    given the images. Without the prior a small held-out set that the head gets
    all right drove ``T`` to the grid's end (0.05), and every probability to 0 or 1:
    on trash6 splits of 15 photos per class that raised the test log loss from
    0.77 to 0.89 on average (one held-out set of 9 photos: 0.63 to 6.3), where the
    prior keeps it at 0.79; with 70 photos per class 0.618 against 0.604
    (docs/accuracy.md). The prior matters less as the images grow in number.
    The minimum is searched on a grid of 401 values from 0.05 to 20.
    """
    logits = np.asarray(logits, np.float64)
    y = np.asarray(y)
    weights = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)
    weights = weights * (len(y) / weights.sum())
    candidates = np.exp(np.linspace(np.log(0.05), np.log(20.0), 401))
    losses = []
    for t in candidates:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        losses.append(-np.sum(weights * log_p[np.arange(len(y)), y]) + np.log(t) ** 2 / (2 * prior_std ** 2))
    return float(candidates[int(np.argmin(losses))])


class TemperatureScaling(Callback):
    """Fit a temperature on the net's held-out split when training ends.

    The temperature that best explains the held-out images' labels (their log
    loss weighted by their ``sample_weight``, as training weighs them, and a
    prior that keeps it near 1: :func:`fit_temperature`) divides the logits
    from then on (``predict_nonlinearity``), so probabilities are calibrated
    and the argmax is unchanged. The net's ``train_split`` must be seeded, so
    that the split here is the one training held out.

    Attributes
    ----------
    temperature_ : float
        The fitted temperature.
    """

    def on_train_end(self, net, X=None, y=None, **kwargs):
        dataset = net.get_dataset(X, y)
        _, valid = net.train_split(dataset, y)
        logits = net.forward(valid, training=False).detach().cpu().double().numpy()
        held_out = np.asarray(valid.indices)
        # Weighted as training and early stopping weigh the images (sample_weight, class_weight).
        weights = X.get("sample_weight") if isinstance(X, dict) else None
        self.temperature_ = fit_temperature(logits, np.asarray(y)[held_out],
                                            None if weights is None else np.asarray(weights)[held_out])
        net.predict_nonlinearity = TemperatureSoftmax(self.temperature_)


# -- the head's settings, checked at fit before any embedding ------------------------


#: What users of scikit-learn's and Keras's networks call some settings.
_OTHER_NAMES = {"learning_rate": "lr", "learning_rate_init": "lr", "hidden_layer_sizes": "hidden_units",
                "alpha": "weight_decay", "l2": "weight_decay", "max_iter": "max_epochs", "epochs": "max_epochs",
                "n_epochs": "max_epochs"}


def _suggestion(key, names):
    """The setting ``key`` was probably meant to be: a named parameter or a prefixed skorch setting."""
    if _OTHER_NAMES.get(key) in names:
        return _OTHER_NAMES[key]
    for prefix in HEAD_PREFIXES:
        bare = prefix[:-2]
        if key.startswith(bare) and not key.startswith(prefix):  # optimizer_lr -> optimizer__lr
            return prefix + key[len(bare):].lstrip("_")
    rest = key.partition("__")[2]
    candidates = [*names, *(p + rest for p in HEAD_PREFIXES if rest)]
    close = difflib.get_close_matches(key, candidates, n=1)
    return close[0] if close else None


def unexpected_setting(key, names, owner, elsewhere=None):
    """The ValueError for a setting ``key`` that is neither one of ``names`` nor prefixed for skorch;
    ``elsewhere`` maps the settings of other estimators to their names."""
    if elsewhere and key in elsewhere:
        return ValueError(f"{owner} got an unexpected setting {key!r}: it is a setting of {elsewhere[key]} only.")
    hint = _suggestion(key, names)
    return ValueError(
        f"{owner} got an unexpected setting {key!r}"
        + (f"; did you mean {hint!r}?" if hint else ".")
        + f" skorch settings are passed with a prefix: {', '.join(p + '*' for p in HEAD_PREFIXES)}."
    )


def _accepted(cls, skip=("self",)):
    """Keyword arguments ``cls`` takes, and whether it takes any (``**kwargs``)."""
    signature = inspect.signature(cls).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.values())
    return set(signature) - set(skip), open_ended


def check_head_settings(params, extra, y_train, *, task, module, classifier, owner, continuing=False,
                        elsewhere=None):
    """Refuse settings the head cannot take, naming them and what is accepted.

    Parameters
    ----------
    params : dict
        The estimator's own parameters (``get_params(deep=False)`` without ``extra``).
    extra : dict
        Every other setting the estimator stores: skorch settings by prefix
        (``optimizer__betas``, ``criterion__label_smoothing``, ...) and,
        refused here with a hint, misspelt ones.
    y_train : ndarray
        Encoded targets; 2-D for multi-label and regression targets.
    task : dict
        The estimator's skorch settings for its targets (``criterion`` ...).
    module : type
        The head's module class.
    classifier : bool
        Whether single-label ``y_train`` holds classes (stratified splits).
    owner : str
        The estimator's class name, for messages.
    continuing : bool
        Whether the fitted head will be trained further (warm_start, partial_fit).
    elsewhere : dict, optional
        Settings of the other estimators: {name: estimator}, named when refused.
    """
    multilabel = classifier and np.ndim(y_train) == 2
    optimizer = head_optimizer(params, full_batch(params, extra, continuing, multilabel))
    targets = {
        "optimizer__": (optimizer, ("self", "params"), {"param_groups"}),  # param_groups: skorch's own
        "criterion__": (task["criterion"], ("self", "reduction"), set()),  # per-sample losses, weighted here
        "module__": (module, ("self",), set()),
        "dataset__": (Dataset, ("self", "X", "y"), set()),
    }
    for key in sorted(extra):
        prefix = next((p for p in HEAD_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise unexpected_setting(key, params, owner, elsewhere)
        name = key[len(prefix):].partition("__")[0]
        if prefix in ("iterator_train__", "iterator_valid__") and name not in FeatureLoader.SUPPORTED:
            raise ValueError(
                f"{key}: the head trains on features already in memory, batched by slicing; "
                f"of the DataLoader settings only {', '.join(FeatureLoader.SUPPORTED)} apply."
            )
        if prefix in targets:
            cls, skip, own = targets[prefix]
            accepted, open_ended = _accepted(cls, skip)
            if not open_ended and name not in accepted | own:
                hint = difflib.get_close_matches(name, accepted, n=1)
                raise ValueError(
                    f"{key}: {cls.__name__} has no argument {name!r}"
                    + (f" (did you mean {prefix}{hint[0]}?)" if hint else "")
                    + f"; it accepts {sorted(accepted | own)}."
                )
    _try_settings(params, extra, y_train, optimizer, task["criterion"])
    for cb in params["callbacks"] or []:
        obj = cb[1] if isinstance(cb, tuple) and len(cb) == 2 else cb
        if not (isinstance(obj, Callback) or (isinstance(obj, type) and issubclass(obj, Callback))):
            raise ValueError(
                f"callbacks contains {cb!r}; expected skorch callbacks "
                "(instances of skorch.callbacks.Callback) or (name, callback) pairs."
            )
    calibration = params.get("calibration")
    if calibration is not None and y_train.ndim != 1:
        raise ValueError(f"calibration={calibration!r} applies to one label per image, not to multi-label y.")
    held_out = [name for name, on in (("early_stopping=True", params["early_stopping"]),
                                      (f"calibration={calibration!r}", calibration is not None)) if on]
    if held_out and classifier and y_train.ndim == 1:
        n_classes = int(y_train.max()) + 1
        n = len(y_train)
        fraction = params["validation_fraction"]
        n_valid = int(np.ceil(fraction * n))
        counts = np.bincount(y_train, minlength=n_classes)
        problems = []
        if counts.min() < 2:
            problems.append(f"the rarest class has {_count(counts.min(), 'image')}, and each class needs one "
                            "on each side")
        if n_valid < n_classes:
            problems.append(f"{_count(n_valid, 'image')} held out for {n_classes} classes, which need one each")
        if n - n_valid < n_classes:
            problems.append(f"{_count(n_valid, 'image')} held out leave {n - n_valid} to train on for "
                            f"{n_classes} classes")
        if problems:
            raise ValueError(
                f"{' and '.join(held_out)} holds out validation_fraction={fraction} "
                f"of the {n} images, stratified by class: {'; '.join(problems)}. Use more images or "
                "another validation_fraction, or turn it off."
            )


def _settings(extra, prefix):
    """The settings of ``extra`` for one object (``prefix``), without the prefix; nested ones left out."""
    return {k: v for k, v in _prefixed(extra, prefix).items() if "__" not in k}


def _try_settings(params, extra, y_train, optimizer, criterion):
    """Build the optimizer, and run the criterion on two dummy rows, with the user's settings,
    so a value they refuse (``optimizer__betas=(1.5, 0.9)``, ``criterion__label_smoothing=2``)
    is told before any image is embedded, not after."""
    given = _settings(extra, "optimizer__")
    given.pop("param_groups", None)  # skorch's, applied to groups of the head's parameters
    if given:
        try:
            optimizer([nn.Parameter(torch.zeros(1))],
                      **{"lr": params["lr"], **_settings(optimizer_defaults(optimizer, extra), "optimizer__"), **given})
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{', '.join('optimizer__' + k for k in sorted(given))}: "
                             f"{optimizer.__name__} refuses them: {e}") from None
    given = _settings(extra, "criterion__")
    if given:
        target = torch.as_tensor(np.asarray(y_train[:2]))
        classes = np.ndim(y_train) == 1 and not torch.is_floating_point(target)
        n_outputs = int(y_train.max()) + 1 if classes else int(np.shape(y_train)[1])
        try:
            loss = criterion(**{**given, "reduction": "none"})
            loss(torch.zeros(len(target), n_outputs), target if classes else target.float())
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{', '.join('criterion__' + k for k in sorted(given))}: "
                             f"{criterion.__name__} refuses them: {e}") from None


# -- building and continuing the head ------------------------------------------------


def optimizer_defaults(optimizer, extra):
    """The settings sktransfer gives ``optimizer`` unless the user's ``extra`` choose how it steps:
    the fused kernel of Adam and AdamW (about a fifth off every head fit, the same updates up to
    float rounding)."""
    chosen = {"optimizer__fused", "optimizer__foreach", "optimizer__differentiable"} & set(extra)
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    fused = (optimizer in (torch.optim.Adam, torch.optim.AdamW) and version >= (2, 4)  # on CPU and GPU
             and "fused" in inspect.signature(optimizer).parameters)
    return {"optimizer__fused": True} if fused and not chosen else {}


def head_features(Z, unfreeze, backbone):
    """What the head's first layer sees for cached ``Z``: the features, or, when
    fine-tuning, the pooled output of the (not yet trained) unfrozen blocks."""
    if not unfreeze:
        return Z.reshape(-1, Z.shape[-1]) if Z.ndim == 3 else Z
    blocks = backbone.blocks(unfreeze)
    shape = backbone.prefix(unfreeze).shape
    flat = Z.reshape(-1, Z.shape[-1])
    with torch.inference_mode():
        pooled = [pooled_features(blocks, shape, torch.from_numpy(flat[k:k + 64]))
                  for k in range(0, len(flat), 64)]
    return torch.cat(pooled).numpy()


def resume(head, previous):
    """Start ``head`` from the fitted ``previous``: its weights (with the feature
    statistics of the first fit, which the weights assume), optimizer state and history."""
    head.initialize()
    head.module_.load_state_dict(previous.module_.state_dict())
    if type(head.optimizer_) is type(previous.optimizer_):
        state = copy.deepcopy(previous.optimizer_.state_dict())
        # Keep the optimizer's running state (e.g. Adam moments) but this fit's lr etc.
        for saved, current in zip(state["param_groups"], head.optimizer_.param_groups):
            saved.update({k: v for k, v in current.items() if k != "params"})
        head.optimizer_.load_state_dict(state)
    head.history = copy.deepcopy(previous.history)


# -- weight_decay="auto": the L2 strength of a linear head, tuned on the features -----

#: L2 strengths tried by ``weight_decay="auto"``, strongest first: each fit
#: starts from the previous one's solution, and the search stops once
#: :data:`L2_PATIENCE` strengths in a row have not improved on the best. On
#: standardised features the strengths chosen on the shared photo sets lay
#: between 0.003 and 0.3.
L2_GRID = tuple(np.logspace(1, -3, 9))
L2_PATIENCE = 2
#: The strength used when nothing can be held out to choose one: the middle of the grid.
L2_FALLBACK = float(L2_GRID[len(L2_GRID) // 2])

#: Weight decay of the heads ``weight_decay="auto"`` does not tune (hidden
#: layers, fine-tuning, augmented views, partial_fit): AdamW's, decoupled.
UNTUNED_WEIGHT_DECAY = 1e-4

#: L-BFGS settings of a full-batch linear head; each epoch is one ``step``.
LBFGS_SETTINGS = dict(line_search_fn="strong_wolfe", max_iter=20, history_size=10,
                      tolerance_grad=1e-5, tolerance_change=1e-7)
#: L-BFGS settings per strength while tuning: the validation loss needs the
#: optimum only roughly, and each fit starts near it (see :func:`tune_l2`
#: for how often the chosen strength is that of a tight fit: 24 in 26, for
#: a third of the work).
TUNING_SETTINGS = dict(LBFGS_SETTINGS, max_iter=15, tolerance_grad=1e-4)


def tune_l2(X, y, weights, criterion, n_outputs, folds):
    """The L2 strength of :data:`L2_GRID` with the least validation loss over ``folds``,
    and the linear layer's mean solution over the folds at that strength.

    A linear model on the standardised features ``X`` is fitted to the
    penalised, weighted loss of the head (the same ``criterion``) on each
    fold's training part, and scored by the unpenalised weighted loss on the
    fold's other part, pooled over the folds. The strengths are tried
    strongest first, each fit starting from the previous solution of its
    fold (a regularisation path, as ``LogisticRegressionCV`` walks one),
    until :data:`L2_PATIENCE` strengths in a row have not improved on the
    best. Folds without weight on both parts are left out.

    The folds' models are fitted together, as one linear layer with the
    outputs of every fold side by side whose loss is the sum of the folds':
    every evaluation reads the features twice in all instead of twice per
    fold, which is most of its cost. The fits are independent, so at the
    optimum this is each fold's own fit; but :data:`TUNING_SETTINGS` stop
    them roughly, and one L-BFGS run over all folds stops elsewhere than
    separate runs. Against fits to a tight tolerance, on 26 subsets (60-420
    images) of the shared photo sets, the strength chosen was the same in
    24, as for separate rough fits (24, not the same two); near-ties, where
    the two best strengths' validation losses differ by about 0.01, can go
    either way. It took half the time of separate fits.

    Returns
    -------
    l2 : float
    weight, bias : Tensor or None
        The average of the folds' solutions at ``l2``: where the final fit
        on all training features starts. None, with the middle strength,
        when no fold has weight on both parts.
    """
    X, y, weights = torch.as_tensor(X), torch.as_tensor(y), torch.as_tensor(weights)
    folds = [(train, valid) for train, valid in folds if weights[train].sum() > 0 and weights[valid].sum() > 0]
    if not folds:
        return L2_FALLBACK, None, None
    n, k = len(X), n_outputs
    # Each fold's images' weights: normalised within each training part (each fold's mean
    # loss), and over all held-out parts together (one pooled validation loss).
    fit_weights, held_out_weights = torch.zeros(n, len(folds)), torch.zeros(n, len(folds))
    for f, (train, valid) in enumerate(folds):
        fit_weights[train, f] = weights[train] / weights[train].sum()
        held_out_weights[valid, f] = weights[valid]
    held_out_weights /= held_out_weights.sum()
    targets = y.repeat_interleave(len(folds))  # image i's target for each fold, as the logits are laid out

    def losses(logits):  # (n, folds * k) logits -> (n, folds) unweighted losses
        return criterion(logits.reshape(n * len(folds), k), targets).view(n, len(folds))

    layer = nn.Linear(X.shape[1], len(folds) * k)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    best, best_loss, solution = 0, np.inf, None
    for i, l2 in enumerate(L2_GRID):
        optimizer = torch.optim.LBFGS(layer.parameters(), lr=1.0, **TUNING_SETTINGS)
        optimizer.step(lambda: linear_loss(layer, X, lambda z: (losses(z) * fit_weights).sum(), l2)[0])
        with torch.no_grad():
            loss = float((losses(layer(X)) * held_out_weights).sum())
        if solution is None or loss < best_loss:
            best, best_loss = i, loss
            solution = _mean_solution(layer.weight.detach().view(len(folds), k, -1),
                                      layer.bias.detach().view(len(folds), k))
        elif i - best >= L2_PATIENCE:
            break
    return float(L2_GRID[best]), *solution


def _mean_solution(weights, biases):
    """The mean of the folds' weights ``(folds, k, d)`` and biases ``(folds, k)`` whose
    solution is finite; (None, None) when none is."""
    finite = torch.isfinite(weights).flatten(1).all(1) & torch.isfinite(biases).all(1)
    if not finite.any():
        return None, None
    return weights[finite].mean(0), biases[finite].mean(0)


def tune_ridge(X, Y, weights):
    """For a squared-error head: the L2 strength of :data:`L2_GRID` with the least
    leave-one-out error, and the solution at it, from scikit-learn's ``RidgeCV``.

    The head's loss on standardised features ``X`` and targets ``Y`` (n, k)
    (the weighted mean over images of the mean squared error over outputs,
    plus ``l2 / 2`` times the sum of squared weights) is ``Ridge``'s
    objective with ``alpha = l2 * weights.sum() * k / 2``, divided by
    ``weights.sum() * k``. ``RidgeCV`` scores each strength by its exact
    leave-one-out error in closed form (one decomposition of ``X`` for the whole
    grid), which no number of folds approaches.

    Returns
    -------
    l2 : float
    weight, bias : Tensor or None
        The ridge solution at ``l2`` (where the final fit starts); None, with
        the middle strength, for fewer than three images with weight.
    """
    from sklearn.linear_model import RidgeCV

    X, Y, weights = np.asarray(X, np.float64), np.asarray(Y, np.float64), np.asarray(weights, np.float64)
    if np.count_nonzero(weights) < 3:  # with two, every strength leaves the same error out
        return L2_FALLBACK, None, None
    factor = weights.sum() * Y.shape[1] / 2
    # No more rows than features: small products on an n x n Gram matrix, one thread.
    # More rows: a d x d problem whose products repay BLAS's threads.
    small = len(X) <= X.shape[1]
    with one_blas_thread() if small else contextlib.nullcontext():
        ridge = RidgeCV(alphas=np.array(L2_GRID) * factor).fit(X, Y, sample_weight=weights)
    return (float(ridge.alpha_ / factor), torch.as_tensor(ridge.coef_, dtype=torch.float32).reshape(Y.shape[1], -1),
            torch.as_tensor(ridge.intercept_, dtype=torch.float32).reshape(Y.shape[1]))


class InitialWeights(Callback):
    """Start a linear head's training from given weights (the tuned solution), not at random.

    The arrays are dropped once training starts, so a fitted head does not carry them.
    """

    def __init__(self, weight, bias):
        self.weight = weight
        self.bias = bias

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        layer = net.module_.layers[-1]
        if self.weight is None or layer.weight.shape != self.weight.shape:
            return
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            layer.bias.copy_(self.bias)
        self.weight = self.bias = None


def _tuning_folds(y, seed):
    """Three folds, stratified, of a single-label classifier's labels ``y`` for
    :func:`tune_l2`, or None when a class has fewer than two images. (A
    squared-error head is tuned by :func:`tune_ridge`; multi-label heads are
    not tuned.) Shuffled by ``seed``."""
    from sklearn.model_selection import StratifiedKFold

    least = int(np.bincount(y).min())
    if least < 2:
        return None
    return list(StratifiedKFold(min(3, least), shuffle=True, random_state=seed).split(y, y))


def holds_out(early_stopping, calibration):
    """Whether a fit holds a seeded share of the images out of training: for early stopping's
    validation loss, or to fit the calibration temperature on."""
    return bool(early_stopping) or calibration is not None


def full_batch(params, extra, continuing, multilabel=False):
    """Whether the head is trained full batch by L-BFGS at an L2 strength (tuned
    for ``weight_decay="auto"``, the number given otherwise): ``optimizer=None``
    for a single-label or regression (not multi-label) linear head without
    dropout on plain (not augmented, not fine-tuned, no
    ``module__hidden_units``) features, trained once by ``fit`` (not
    ``partial_fit``, nor ``warm_start=True``, which train further with AdamW),
    and no ``optimizer__*`` settings (those are meant for AdamW).

    Dropout draws another loss at every evaluation, which L-BFGS's line
    search cannot follow: such heads are AdamW's.

    Multi-label heads are not tuned: the strength of least validation loss
    shrinks rare labels' probabilities below the 0.5 at which they are
    predicted (F1 over samples 0.50 against AdamW's 0.63 in a 3-fold
    cross-validation on the 30 photos of the multi-label tests).
    """
    return (not multilabel and params["optimizer"] is None
            and not params["hidden_units"] and not extra.get("module__dropout", params["dropout"])
            and not params["unfreeze"] and params["augment"] is None and not continuing
            and not params.get("warm_start") and "module__hidden_units" not in extra
            and not any(k.startswith("optimizer__") for k in extra))


#: Settings of the training batches that a full-batch linear head leaves out: its one
#: batch is every training image, never split nor dropped.
FULL_BATCH_UNREAD = ("iterator_train__batch_size", "iterator_train__drop_last")


def unread_settings(params, defaults, extra):
    """The settings a full-batch linear head would not read, ``{name: value}``:
    ``lr`` and ``batch_size`` where they differ from ``defaults`` (the
    estimator's), and those of :data:`FULL_BATCH_UNREAD` where ``extra`` sets them."""
    unread = {name: params[name] for name in ("lr", "batch_size") if params[name] != defaults[name]}
    unread.update({name: extra[name] for name in FULL_BATCH_UNREAD if extra.get(name)})
    return unread


def warn_unread_settings(params, defaults, extra):
    """Warn of the :func:`unread_settings` of a full-batch linear head: a grid over
    them would give equal candidates. As scikit-learn warns of a setting its
    solver ignores."""
    unread = [f"{name}={value!r}" for name, value in unread_settings(params, defaults, extra).items()]
    if unread:
        warnings.warn(
            f"{' and '.join(unread)} {'is' if len(unread) == 1 else 'are'} not used by this fit: the linear "
            "head is fitted full batch by L-BFGS, one batch of every training image, which reads neither lr "
            "nor any batch size (its L2 strength is weight_decay) and drops no batch. They apply to heads AdamW "
            "trains: with hidden_units, dropout or optimizer=torch.optim.AdamW, and when partial_fit or "
            "warm_start=True trains a head further.",
            UserWarning,
            stacklevel=4,  # the user's fit
        )


def head_optimizer(params, full):
    """The optimizer class: ``optimizer``, or for None, L-BFGS (full batch) or AdamW."""
    if params["optimizer"] is not None:
        return params["optimizer"]
    return torch.optim.LBFGS if full else torch.optim.AdamW


# -- the head -------------------------------------------------------------------------


def build_head(params, extra, Z, y_train, weights, n_outputs, *, net, task, hidden_units, device,
               backbone=None, seed=None, stratified=False, continuing=False):
    """The skorch net that learns ``y_train`` from the cached features ``Z``.

    Parameters
    ----------
    params : dict
        The estimator's parameters (``hidden_units``, ``lr``, ``weight_decay``, ...).
    extra : dict
        Prefixed skorch settings; they override what is built here.
    Z : ndarray
        Cached features (n, d), views (n, n_views, d), or the frozen part's
        activations when fine-tuning.
    y_train, weights : ndarray
        Encoded targets and per-sample weights.
    n_outputs : int
        Logits or regression outputs.
    net : type
        The skorch net class; ``task`` its criterion and other settings.
    hidden_units : tuple of int
        Checked hidden layer widths.
    device : str
        Torch device of the head.
    backbone : Backbone, optional
        The frozen backbone (its blocks when fine-tuning).
    seed : int, optional
        Seed of the held-out split and of the tuning folds.
    stratified : bool
        Whether splits are stratified by class.
    continuing : bool
        Whether the fitted head will be trained further (warm_start, partial_fit).
    """
    unfreeze = params["unfreeze"]
    features = head_features(Z, unfreeze, backbone)
    mean, scale = feature_statistics(features)
    full = full_batch(params, extra, continuing, multilabel=issubclass(net, HeadMultiLabelClassifier))
    optimizer = head_optimizer(params, full)
    tuned = {}
    if unfreeze:
        tuned = dict(module__blocks=backbone.blocks(unfreeze), module__shape=backbone.prefix(unfreeze).shape)
        if "optimizer__param_groups" not in extra:
            tuned["optimizer__param_groups"] = [("blocks.*", {"lr": params["lr"] * params["backbone_lr_mult"]})]
    weight_decay = params["weight_decay"]
    callbacks = list(params["callbacks"] or [])
    held_out = holds_out(params["early_stopping"], params.get("calibration"))
    if full:
        criterion = task["criterion"](**{"reduction": "none", **_prefixed(task, "criterion__"),
                                         **_prefixed(extra, "criterion__")})
        l2, weight, bias = weight_decay, None, None  # a number: that strength, from zero
        if weight_decay == "auto":
            standard = ((features - mean) / scale).astype(np.float32)
            if type(criterion) is nn.MSELoss:  # leave-one-out in closed form
                l2, weight, bias = tune_ridge(standard, y_train, weights)
            else:
                # Unseeded fits tune on folds of seed 0: the same strength every time, as
                # LogisticRegressionCV's fixed folds give.
                folds = _tuning_folds(y_train, 0 if params.get("random_state") is None else seed)
                l2 = L2_FALLBACK  # too few images of a class to hold any out
                if folds is not None:
                    l2, weight, bias = tune_l2(standard, y_train, weights, criterion, n_outputs, folds)
        if weight is not None and not held_out:
            # Start at the tuned solution, unless a validation split holds images
            # out of training: the folds' solution has seen them.
            callbacks.append(("initial_weights", InitialWeights(weight, bias)))
        callbacks.append(("converged", Converged(LBFGS_SETTINGS["tolerance_change"])))
        # One batch of all images; each epoch is one L-BFGS step, with its own line search.
        tuned.update(l2=l2, lr=1.0, batch_size=len(features), iterator_train__shuffle=False,
                     **{f"optimizer__{k}": v for k, v in LBFGS_SETTINGS.items()})
    else:
        decay = UNTUNED_WEIGHT_DECAY if weight_decay == "auto" else weight_decay
        if "weight_decay" in inspect.signature(optimizer).parameters:
            tuned["optimizer__weight_decay"] = decay
        elif decay:
            tuned["l2"] = decay  # an optimizer without weight decay: the same as a penalty in the loss
    train_split = None
    if held_out:
        # Seeded: the calibration callback draws the same split after training.
        train_split = ValidSplit(params["validation_fraction"], stratified=stratified, random_state=seed)
    if params["early_stopping"]:
        callbacks.append(("early_stopping", EarlyStopping(patience=params["n_iter_no_change"], load_best=True)))
    if params.get("calibration") == "temperature":
        callbacks.append(("calibration", TemperatureScaling()))
    # skorch's PrintLog formats a table row every epoch even when nothing is
    # printed; over the many short fits of a grid search that costs more
    # than the head's arithmetic, so it is left out unless verbose.
    quiet = {} if params["verbose"] else {"callbacks__print_log": None}
    settings = dict(
        module=BlocksAndHead if unfreeze else HeadModule,
        module__in_features=features.shape[1],
        module__n_outputs=n_outputs,
        module__hidden_units=hidden_units,
        module__dropout=params["dropout"],
        module__mean=mean,
        module__scale=scale,
        optimizer=optimizer,
        lr=params["lr"],
        max_epochs=params["max_epochs"],
        batch_size=params["batch_size"],
        train_split=train_split,
        callbacks=callbacks,
        iterator_train=FeatureLoader,
        iterator_valid=FeatureLoader,
        iterator_train__shuffle=True,
        device=device,
        verbose=params["verbose"],
        **task,
        **quiet,
    )
    settings.update(tuned)
    settings.update(optimizer_defaults(optimizer, extra))
    settings.update(extra)  # prefixed settings the user gave win
    if full:  # but the one batch is never split nor dropped (warn_unread_settings says so)
        for name in FULL_BATCH_UNREAD:
            settings.pop(name, None)
    return net(**settings)


def _prefixed(settings, prefix):
    return {k[len(prefix):]: v for k, v in settings.items() if k.startswith(prefix)}
