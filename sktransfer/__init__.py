"""sktransfer: transfer learning for images, the scikit-learn way.

A frozen ImageNet-pretrained backbone turns each image into a feature vector
once; a small head trained by skorch classifies them. Estimators take image
paths and work in Pipelines, GridSearchCV and cross-validation.
"""

from ._audit import AuditReport, audit
from ._backbones import Backbone, list_backbones
from ._distributed import embed_dask
from ._estimator import ImageEmbedder, PretrainedImageClassifier, PretrainedImageRegressor
from ._export import load_model, save_model
from ._explain import explain
from ._features import cache_info, clear_cache, set_memory_cache_size
from ._images import Preprocessing
from ._inputs import ImageInputError, load_image_folder
from ._plotting import plot_history, plot_top_losses
from ._version import __version__  # noqa: F401 (the package's version)

__all__ = [
    "AuditReport",
    "Backbone",
    "ImageEmbedder",
    "ImageInputError",
    "PretrainedImageClassifier",
    "PretrainedImageRegressor",
    "Preprocessing",
    "audit",
    "cache_info",
    "clear_cache",
    "embed_dask",
    "explain",
    "list_backbones",
    "load_image_folder",
    "load_model",
    "plot_history",
    "plot_top_losses",
    "save_model",
    "set_memory_cache_size",
]
