"""sktransfer: transfer learning for images, the scikit-learn way.

A frozen ImageNet-pretrained backbone turns each image into a feature vector
once; a small head trained by skorch classifies them. Estimators take image
paths and work in Pipelines, GridSearchCV and cross-validation.
"""

from importlib import import_module as _import_module

from ._version import __version__  # noqa: F401 (the package's version)

#: Each public name and the module that defines it. A name is imported when it is
#: first used (PEP 562), so that ``import sktransfer`` and ``sktransfer --help``
#: do not wait seconds for torch, scikit-learn and skorch to load.
_MODULES = {
    "AuditReport": "_audit",
    "Backbone": "_backbones",
    "ImageEmbedder": "_estimator",
    "ImageInputError": "_inputs",
    "PretrainedImageClassifier": "_estimator",
    "PretrainedImageRegressor": "_estimator",
    "Preprocessing": "_images",
    "audit": "_audit",
    "TopLossesDisplay": "_plotting",
    "cache_info": "_cache",
    "clear_cache": "_cache",
    "embed_dask": "_distributed",
    "explain": "_explain",
    "export_onnx": "_onnx",
    "list_backbones": "_backbones",
    "load_image_folder": "_inputs",
    "load_model": "_export",
    "plot_history": "_plotting",
    "plot_top_losses": "_plotting",
    "save_model": "_export",
    "set_memory_cache_size": "_cache",
}

__all__ = list(_MODULES)


def __getattr__(name):
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_import_module(f".{module}", __name__), name)
    globals()[name] = value  # later uses find it without calling here
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
