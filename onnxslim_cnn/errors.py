"""Exception hierarchy of onnxslim_cnn.

Library code raises these and never prints or exits; the CLI maps each class to one
stderr line and an exit code (``exit_code``): 2 for bad input or usage, 1 when the
result failed validation and nothing was written, 3 for an internal error.
"""

from __future__ import annotations


class OnnxSlimError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 3


class UsageError(OnnxSlimError):
    """Options that contradict each other or name something that does not exist."""

    exit_code = 2


class InvalidModelError(OnnxSlimError):
    """The input is not a loadable, checker-valid ONNX model."""

    exit_code = 2


class UnsupportedModelError(OnnxSlimError):
    """A valid model that this tool (or onnxruntime) cannot process."""

    exit_code = 2


class DataError(OnnxSlimError):
    """Calibration or validation data that cannot be read or does not fit the model."""

    exit_code = 2


class OutputError(OnnxSlimError):
    """The output path cannot be written."""

    exit_code = 2


class PreconditionError(OnnxSlimError):
    """A pass cannot apply to this model at all (raised by ``Pass.check``)."""

    exit_code = 2


class PassError(OnnxSlimError):
    """A pass crashed; carries the pass name and the passes that ran before it."""

    exit_code = 3

    def __init__(self, pass_name: str, before: tuple[str, ...], cause: BaseException):
        self.pass_name = pass_name
        self.before = before
        self.cause = cause
        chain = " -> ".join(before) if before else "(first pass)"
        super().__init__(
            f"pass '{pass_name}' failed after [{chain}]: {type(cause).__name__}: {cause}"
        )


class ValidationError(OnnxSlimError):
    """The result does not compute what the original computed within the budget.

    ``report`` holds the run's report when one was made, so callers can show it.
    """

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
