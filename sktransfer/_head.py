"""Stage 5: the trainable head on top of the features.

A small network (linear, or an MLP with ``hidden_units``) whose first step
standardises the features with statistics of the training set, trained by
skorch. Only this part learns; the backbone stays frozen.
"""

from __future__ import annotations

import numpy as np
import torch
from skorch import NeuralNetClassifier, NeuralNetRegressor
from torch import nn

from ._backbones import pool


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

    def forward(self, X, sample_weight=None):
        # sample_weight rides along in skorch's batches; the loss uses it (below).
        X, n_views = pick_view(X, self.training)
        out = self.layers((X - self.mean) / self.scale)
        return out if n_views is None else out.view(-1, n_views, out.shape[-1]).mean(dim=1)


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

    def forward(self, X, sample_weight=None):
        X, n_views = pick_view(X, self.training)
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


class WeightedLossMixin:
    """For a skorch net: a loss averaged with per-sample weights.

    Batches are ``{"X": features, "sample_weight": w}``; the criterion must be
    built with ``reduction="none"``.
    """

    def get_loss(self, y_pred, y_true, X=None, training=False):
        from skorch.utils import to_tensor

        losses = self.criterion_(y_pred, to_tensor(y_true, device=self.device))
        if losses.ndim > 1:  # one loss per output (multi-label, multi-output)
            losses = losses.mean(dim=tuple(range(1, losses.ndim)))
        weights = X.get("sample_weight") if isinstance(X, dict) else None
        if weights is None:
            return losses.mean()
        weights = to_tensor(weights, device=self.device)
        return (losses * weights).sum() / weights.sum()


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
    from skorch.callbacks import EarlyStopping

    return any(isinstance(cb, EarlyStopping) and cb.misses_ >= cb.patience
               for _, cb in getattr(net, "callbacks_", []))


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

