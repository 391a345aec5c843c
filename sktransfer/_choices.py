"""Values that settings of several stages accept, and a default the command line states.

A leaf module, importing nothing: the command line builds its options and
their help from here without waiting for torch.
"""

#: What runs the frozen backbone (``engine=``); see :mod:`sktransfer._engine`.
ENGINES = ("auto", "torch", "openvino")
#: The backbone's arithmetic (``precision=``); see :mod:`sktransfer._engine`.
PRECISIONS = ("auto", "float32", "bfloat16")
#: ``PretrainedImageClassifier``'s default ``max_epochs``, which ``sktransfer fit --help`` states.
CLASSIFIER_MAX_EPOCHS = 15
