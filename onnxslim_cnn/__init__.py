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
from .manager import PRESETS, compress  # noqa: E402

__all__ = [
    "PRESETS", "Budget", "Config", "DataConfig", "DataError", "InvalidModelError",
    "OnnxSlimError", "OutputError", "PassError", "PreconditionError", "Tolerance",
    "UnsupportedModelError", "UsageError", "ValidationError", "__version__", "compress",
]
