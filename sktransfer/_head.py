"""Stage 5: the trainable head on top of the features.

A small network (linear, or an MLP with ``hidden_units``) whose first step
standardises the features with statistics of the training set, trained by
skorch. Only this part learns; the backbone stays frozen.
"""

from __future__ import annotations

import torch
from skorch import NeuralNetClassifier
from torch import nn


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
    x = blocks(x)
    return x.mean(dim=(2, 3)) if x.ndim == 4 else x.flatten(1)


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


class HeadClassifier(WeightedLossMixin, NeuralNetClassifier):
    """skorch's NeuralNetClassifier with a sample-weighted loss."""


def feature_statistics(Z):
    """Per-feature mean and scale (standard deviation, 1 where it is 0)."""
    mean = Z.mean(axis=0)
    scale = Z.std(axis=0)
    scale[scale == 0] = 1.0
    return mean, scale
