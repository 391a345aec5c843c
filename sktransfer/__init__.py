"""sktransfer: transfer learning for images, the scikit-learn way.

A frozen ImageNet-pretrained backbone turns each image into a feature vector
once; a small head trained by skorch classifies them. Estimators take image
paths and work in Pipelines, GridSearchCV and cross-validation.
"""

import lazy_loader as _lazy

from ._version import __version__  # noqa: F401 (the package's version)

# Each public name is imported when it is first used (PEP 562), so that
# ``import sktransfer`` and ``sktransfer --help`` do not wait seconds for torch,
# scikit-learn and skorch. The names, and the modules that define them, are
# the imports of __init__.pyi, which editors and type checkers read.
__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
