# The public names, for editors and type checkers (``X as X``: re-exported), and
# for the lazy loading of __init__.py, which reads these imports
# (lazy_loader.attach_stub).
from ._audit import AuditReport as AuditReport, audit as audit
from ._backbones import Backbone as Backbone, list_backbones as list_backbones
from ._cache import (
    cache_info as cache_info,
    clear_cache as clear_cache,
    set_memory_cache_size as set_memory_cache_size,
)
from ._distributed import embed_dask as embed_dask
from ._estimator import (
    ImageEmbedder as ImageEmbedder,
    PretrainedImageClassifier as PretrainedImageClassifier,
    PretrainedImageRegressor as PretrainedImageRegressor,
)
from ._explain import explain as explain
from ._export import load_model as load_model, save_model as save_model
from ._images import Preprocessing as Preprocessing
from ._inputs import ImageInputError as ImageInputError, load_image_folder as load_image_folder
from ._onnx import export_onnx as export_onnx
from ._plotting import (
    TopLossesDisplay as TopLossesDisplay,
    plot_history as plot_history,
    plot_top_losses as plot_top_losses,
)

__version__: str

__all__ = [
    "AuditReport",
    "Backbone",
    "ImageEmbedder",
    "ImageInputError",
    "PretrainedImageClassifier",
    "PretrainedImageRegressor",
    "Preprocessing",
    "TopLossesDisplay",
    "audit",
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
