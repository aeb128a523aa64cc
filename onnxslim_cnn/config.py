"""Typed configuration of a compression run: pipeline, data, tolerances and budgets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Tolerance:
    """Elementwise bound for lossless passes, checked against the original's outputs.

    A candidate output ``y`` matches the reference ``r`` when for every element
    ``|y - r| <= atol * max(1, max|r|) + rtol * |r|``; ``atol`` is scaled by the
    output's magnitude so that logits in the thousands and probabilities below one
    get the same relative strictness.
    """

    rtol: float = 1e-4
    atol: float = 1e-5

    @staticmethod
    def for_dtype(dtype: Any) -> Tolerance:
        """The default lossless tolerance for outputs of ``dtype``."""
        import numpy as np

        if np.dtype(dtype) == np.float16:
            return Tolerance(rtol=1e-2, atol=2e-3)
        return Tolerance()


@dataclass(frozen=True)
class Budget:
    """Accuracy budget of lossy passes, measured against the original model.

    Attributes:
        max_top1_drop: largest allowed top-1 accuracy loss in points (needs labels).
        min_top1_agreement: smallest fraction of samples whose top-1 class must agree
            with the original's (classifier-shaped outputs; None = not checked).
        min_cosine: smallest cosine similarity between original and candidate outputs.
        top1_replaces_cosine: when labels are present, judge by the top-1 drop (and the
            agreement floor, if set) and not by ``min_cosine``. The CLI sets it when the
            user states ``--max-top1-drop`` and no ``--min-cosine``: the stated budget is
            the one that binds. Without labels the cosine floor always applies.
    """

    max_top1_drop: float = 1.0
    min_top1_agreement: float | None = None
    min_cosine: float = 0.99
    top1_replaces_cosine: bool = False

    def cosine_floor(self, labelled: bool) -> float:
        """The cosine the outputs must keep; -1 (no floor) when top-1 replaces it."""
        return -1.0 if self.top1_replaces_cosine and labelled else self.min_cosine


@dataclass(frozen=True)
class DataConfig:
    """Where calibration/validation inputs come from.

    Attributes:
        path: image folder, IDX folder, ``.npy`` or ``.npz``; None = seeded random.
        preproc: preprocessing spec for images (``model.preproc.json`` format).
        calib_count: samples used for calibration; the rest validate.
        val_count: at most this many validation samples (None = all the rest).
        random_count: samples per split when inputs are random.
        seed: seed for the random inputs and the calibration/validation split.
    """

    path: Path | None = None
    preproc: Path | None = None
    calib_count: int = 100
    val_count: int | None = None
    random_count: int = 8
    seed: int = 0


@dataclass(frozen=True)
class Config:
    """A whole compression run.

    Attributes:
        passes: pass names in the order they run (validated, never re-sorted); None
            runs the default preset, an empty tuple runs none (load, check, write).
        options: flat pass options (``sparsity``, ``bits`` ...); each pass reads the
            fields of its own ``Options`` dataclass from here.
        validate: compare against onnxruntime after each pass (off only when the
            input cannot run in onnxruntime and the user asked for it).
        force: write the result even when the final validation fails.
        preset: the preset whose pass options apply (``passes`` None: its passes too;
            None with no passes: the default preset).
        target_size: the auto-compress pass aims at a file of at most this many bytes.
    """

    passes: tuple[str, ...] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    budget: Budget = field(default_factory=Budget)
    tolerance: Tolerance | None = None
    validate: bool = True
    force: bool = False
    quiet: bool = True
    seed: int = 0
    preset: str | None = None
    target_size: int | None = None


_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``2MB``, ``500 KB``, ``1.5MiB``, ``123456`` (decimal units,
    KiB/MiB binary).

    Raises:
        UsageError: not a positive size.
    """
    import re

    from .errors import UsageError

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UsageError(f"'{text}' is not a size (examples: 2MB, 500KB, 123456)")
    return max(1, int(float(match.group(1)) * _UNITS[unit]))
