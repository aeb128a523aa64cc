"""onnxslim_cnn: framework-agnostic compression of CNNs in ONNX form.

>>> from onnxslim_cnn import compress, Config
>>> report = compress("in.onnx", "out.onnx", Config(passes=("fold-bn",)))
"""

__version__ = "0.1.0"

from .config import Budget, Config, DataConfig, Tolerance  # noqa: E402
from .errors import (  # noqa: E402
    DataError,
    InvalidModelError,
    OnnxSlimError,
    OutputError,
    PassError,
    PreconditionError,
    UnsupportedModelError,
    UsageError,
    ValidationError,
)


def __getattr__(name: str):
    # ``compress`` and ``PRESETS`` pull in onnxruntime and every pass; import them on
    # first use so that ``python -m onnxslim_cnn`` can turn a broken environment or a
    # Ctrl-C during start-up into one line instead of a traceback.
    if name in ("compress", "PRESETS"):
        from . import manager

        return getattr(manager, name)
    raise AttributeError(f"module 'onnxslim_cnn' has no attribute {name!r}")


__all__ = [
    "PRESETS", "Budget", "Config", "DataConfig", "DataError", "InvalidModelError",
    "OnnxSlimError", "OutputError", "PassError", "PreconditionError", "Tolerance",
    "UnsupportedModelError", "UsageError", "ValidationError", "__version__", "compress",
]
