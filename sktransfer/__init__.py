"""sktransfer: transfer learning for images, the scikit-learn way.

A frozen ImageNet-pretrained backbone turns each image into a feature vector
once; a small head trained by skorch classifies them. Estimators take image
paths and work in Pipelines, GridSearchCV and cross-validation.
"""

__version__ = "0.1.0"

from ._backbones import Backbone, list_backbones  # noqa: E402
from ._distributed import embed_dask  # noqa: E402
from ._estimator import ImageEmbedder, PretrainedImageClassifier, PretrainedImageRegressor  # noqa: E402
from ._export import load_model, save_model  # noqa: E402
from ._explain import explain  # noqa: E402
from ._features import cache_info, clear_cache, set_memory_cache_size  # noqa: E402
from ._images import Preprocessing  # noqa: E402
from ._inputs import ImageInputError, load_image_folder  # noqa: E402
from ._onnx import export_onnx  # noqa: E402
from ._plotting import TopLossesDisplay, plot_history, plot_top_losses  # noqa: E402

__all__ = [
    "Backbone",
    "ImageEmbedder",
    "ImageInputError",
    "PretrainedImageClassifier",
    "PretrainedImageRegressor",
    "Preprocessing",
    "TopLossesDisplay",
    "cache_info",
    "clear_cache",
    "embed_dask",
    "explain",
    "export_onnx",
    "list_backbones",
    "load_image_folder",
    "load_model",
    "plot_history",
    "plot_top_losses",
    "save_model",
    "set_memory_cache_size",
]
