"""Export a fitted model to ONNX: one graph from decoded pixels to predictions.

The graph takes a batch of RGB images already resized and centre-cropped to
the backbone's input size (``uint8``, shape ``(n, crop_size, crop_size, 3)``)
and does the rest in one pass: scaling to [0, 1], the weights' mean/std
normalisation, the backbone, the head and the output transform (softmax with
the fitted temperature, one sigmoid per label, or the regression target
scaling undone). Decoding, resizing and cropping stay outside, because they
are done on the whole image by an image library (see docs/deployment.md for
the few lines with Pillow); what they need is in the model's metadata.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._engine import onnx_graph
from ._outputs import write_atomic

__all__ = ["export_onnx"]

#: ONNX operator set of the exported graphs (onnxruntime 1.17 and later run it).
OPSET = 17


class _Pixels(nn.Module):
    """uint8 NHWC pixels to the normalised NCHW float batch the backbone expects."""

    def __init__(self, preprocessing):
        super().__init__()
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, images):
        # (x / 255 - mean) / std, with the 255 folded into the constants.
        return (images.permute(0, 3, 1, 2).float() - self.mean) / self.std


class _Graph(nn.Module):
    """Pixels, backbone, optional head and output transform, as one module."""

    def __init__(self, preprocessing, body, head=None, output=None):
        super().__init__()
        self.pixels = _Pixels(preprocessing)
        self.body = body
        self.head = head
        self.output = output

    def forward(self, images):
        out = self.body(self.pixels(images))
        if self.head is not None:
            out = self.head(out)
        return out if self.output is None else self.output(out)


class _Softmax(nn.Module):
    def __init__(self, temperature):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, logits):
        return torch.softmax(logits / self.temperature, dim=-1)


class _Sigmoid(nn.Module):
    def forward(self, logits):
        return torch.sigmoid(logits)


class _Unscale(nn.Module):
    """Undo the regressor's target scaling; one column per output."""

    def __init__(self, mean, scale, single_output):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale), dtype=torch.float32))
        self.single_output = bool(single_output)

    def forward(self, out):
        out = out * self.scale + self.mean
        return out[:, 0] if self.single_output else out


def _labels(values):
    """Class labels as JSON values (numpy scalars become Python ones)."""
    return [v.item() if isinstance(v, np.generic) else v for v in np.asarray(values, dtype=object).tolist()]


def _parts(model):
    """The backbone module, head, output transform, output name and metadata of ``model``."""
    from ._estimator import ImageEmbedder, PretrainedImageClassifier, PretrainedImageRegressor

    if isinstance(model, ImageEmbedder):
        check_is_fitted(model, "backbone_")
        backbone = model.backbone_
        return backbone, backbone.module, None, None, "features", {"task": "features"}
    if not isinstance(model, (PretrainedImageClassifier, PretrainedImageRegressor)):
        raise TypeError(
            f"export_onnx exports a fitted PretrainedImageClassifier, PretrainedImageRegressor or "
            f"ImageEmbedder; got {type(model).__name__}. For a Pipeline, export its sktransfer step "
            "and apply the other steps to the graph's output."
        )
    check_is_fitted(model, "head_")
    if getattr(model, "tta", None) is not None:
        raise ValueError(
            f"tta={model.tta!r} cannot be exported: test-time augmentation averages predictions over "
            "views cut from the whole decoded image (a mirror image, crops shifted into the margin the "
            "centre crop leaves), while the graph sees only the centre crop. Export with "
            "model.set_params(tta=None); the head is the same, only prediction changes."
        )
    backbone = model.embedder_.backbone_
    unfreeze = getattr(model, "unfreeze_", 0)
    # With fine-tuned blocks the head module holds them; the frozen part runs before it.
    body = backbone.prefix(unfreeze).module if unfreeze else backbone.module
    head = copy.deepcopy(model.head_.module_).cpu().eval()
    if isinstance(model, PretrainedImageRegressor):
        output = _Unscale(model.target_mean_, model.target_scale_, model._single_output)
        return backbone, body, head, output, "predictions", {
            "task": "regression", "n_outputs": str(model.n_outputs_)}
    if model.multilabel_:
        return backbone, body, head, _Sigmoid(), "probabilities", {
            "task": "multilabel", "classes": json.dumps(_labels(model.classes_))}
    return backbone, body, head, _Softmax(model.temperature_), "probabilities", {
        "task": "classification", "classes": json.dumps(_labels(model.classes_)),
        "temperature": repr(float(model.temperature_))}


def export_onnx(model, path):
    """Write a fitted model as one ONNX graph from decoded pixels to predictions.

    The graph's input ``images`` is a ``uint8`` batch of shape
    ``(n, crop_size, crop_size, 3)``: RGB images resized (shorter side to
    ``resize_size``, with the weights' interpolation) and centre-cropped, as
    :meth:`Preprocessing.to_array` does; the batch size is free. Its output is

    * ``probabilities`` (n, n_classes) for a classifier: the softmax with the
      fitted temperature, columns in the order of ``classes_``; for a
      multi-label classifier one sigmoid per label;
    * ``predictions`` (n,) or (n, n_outputs) for a regressor, in the units of
      ``y`` (the target scaling is undone);
    * ``features`` (n, num_features) for an :class:`ImageEmbedder`.

    The model's metadata (``onnx.ModelProto.metadata_props``, read with
    ``onnxruntime.InferenceSession(path).get_modelmeta().custom_metadata_map``)
    holds ``task``, ``classes`` (a JSON list), ``resize_size``,
    ``crop_size``, ``interpolation``, ``backbone`` and the sktransfer version.

    Parameters
    ----------
    model : fitted PretrainedImageClassifier, PretrainedImageRegressor or ImageEmbedder
        Models fitted with ``unfreeze`` export with their fine-tuned blocks.
    path : str or path-like
        The ``.onnx`` file to write (replaced atomically; missing folders are made).

    Returns
    -------
    path : pathlib.Path
        The file written.

    Raises
    ------
    ValueError
        For ``tta`` set: its views are cut from the whole image, which the
        graph never sees (``set_params(tta=None)`` first).
    TypeError
        For anything but the three estimators (e.g. a Pipeline).
    IsADirectoryError
        For a ``path`` that is a folder (before the export).

    See Also
    --------
    Preprocessing.to_array : the resize and crop that come before the graph.

    Examples
    --------
    >>> import os, tempfile
    >>> from sktransfer import ImageEmbedder, export_onnx
    >>> export_onnx(ImageEmbedder().fit(), os.path.join(tempfile.mkdtemp(), "features.onnx")).name
    'features.onnx'
    """
    from ._version import __version__

    _require_onnx()  # before the export, which takes a while
    backbone, body, head, output, output_name, metadata = _parts(model)
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"export_onnx: {str(path)!r} is a folder; give the .onnx file to write in it, "
                                f"e.g. {str(path / 'model.onnx')!r}.")
    prep = backbone.preprocessing
    graph = _Graph(prep, copy.deepcopy(body).cpu().float().eval(), head, output).eval()
    h, w = prep.crop_shape
    metadata.update({
        "producer": f"sktransfer {__version__}",
        "estimator": type(model).__name__,
        "backbone": backbone.name,
        "input": f"images: uint8 (n, {h}, {w}, 3) RGB, decoded, resized and cropped as resize_size, "
                 "crop_size, crop_mode and interpolation say",
        "output": output_name,
        # JSON: an int (the shorter side / a square) or [height, width].
        "resize_size": json.dumps(prep.resize_size),
        "crop_size": json.dumps(prep.crop_size),
        "crop_mode": prep.crop_mode,
        "interpolation": prep.interpolation,
    })
    example = torch.zeros(2, h, w, 3, dtype=torch.uint8)
    graph_bytes = onnx_graph(graph, example, input_names=["images"], output_names=[output_name],
                             dynamic_axes={"images": {0: "n"}, output_name: {0: "n"}}, opset=OPSET)
    write_atomic(path, _with_metadata(graph_bytes, metadata), makedirs=True)
    return path


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("export_onnx needs the onnx package: pip install 'sktransfer[onnx]'.") from None
    return onnx


def _with_metadata(graph, metadata):
    """The serialised ONNX model ``graph`` (bytes) with ``metadata`` and a doc string added."""
    onnx = _require_onnx()
    proto = onnx.load_model_from_string(graph)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    proto.doc_string = f"{metadata['estimator']} on {metadata['backbone']}: images -> {metadata['output']}"
    return proto.SerializeToString()
