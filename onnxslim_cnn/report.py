"""The run report: per-pass records, final metrics, JSON and a text table."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OutputError


@dataclass
class PassRecord:
    """One pass of the pipeline.

    ``status`` is one of: applied, no-op, rolled-back (validation failed), failed (the
    pass crashed; rolled back), skipped (precondition not met).
    """

    name: str
    status: str
    reason: str | None = None
    size_before: int = 0
    size_after: int = 0
    seconds: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)
    declined: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Report:
    input: str
    output: str
    size_in: int = 0
    size_out: int = 0
    opset_in: int = 0
    opset_out: int = 0
    data: str = ""
    calib_samples: int = 0
    val_samples: int = 0
    normalized: dict[str, int] = field(default_factory=dict)
    passes: list[PassRecord] = field(default_factory=list)
    final: dict[str, Any] | None = None
    failure: str | None = None
    written: bool = False
    seconds: float = 0.0
    target_size: int | None = None
    explored: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.size_in / self.size_out if self.size_out else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (numpy scalars -> numbers, Inf/NaN -> None)."""
        return _plain(self) | {"ratio": _plain(self.ratio)}

    def write_json(self, path: str | Path) -> None:
        """Write the report atomically (temp file in the same folder, then replace).

        Raises:
            OutputError: the folder is missing or not writable.
        """
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        _atomic_write(Path(path), lambda handle: handle.write(text.encode()))

    def write_plot(self, path: str | Path) -> bool:
        """PNG of the explored size / accuracy trade-off (``explored``), written
        atomically; False (nothing written) without matplotlib or explored points.

        Raises:
            OutputError: the folder is missing or not writable.
        """
        if not self.explored:
            return False
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        figure = _plot(plt, self.explored, Path(self.input).name)
        try:
            _atomic_write(Path(path), lambda handle: figure.savefig(handle, format="png"))
        finally:
            plt.close(figure)
        return True

    def table(self) -> str:
        """A human-readable summary (one line per pass, then the totals)."""
        head = f"{'pass':<20} {'status':<12} {'size':>22} {'max|err|':>9} " \
               f"{'cosine':>9} {'top-1 agr':>9} {'time':>7}"
        lines = [head, "-" * len(head)]
        for rec in self.passes:
            lines.append(_pass_line(rec))
            lines += [f"{'':<20} {k}: {_num(v)}" for k, v in rec.stats.items() if v]
            lines += [f"{'':<20} declined x{n}: {why}" for why, n in rec.declined.items()]
            if rec.reason and rec.status != "applied":
                lines.append(f"{'':<20} reason: {rec.reason}")
        lines.append("-" * len(head))
        lines.append(self._summary())
        return "\n".join(lines)

    def _summary(self) -> str:
        final = self.final or {}
        parts = [f"{_size(self.size_in)} -> {_size(self.size_out)} ({self.ratio:.2f}x)"]
        if final.get("top1_agreement") is not None:
            parts.append(f"top-1 agreement {100 * final['top1_agreement']:.1f}%")
        if final.get("top1_drop") is not None:
            error = final.get("top1_error")
            parts.append(f"top-1 drop {final['top1_drop']:.2f} pt" + (
                "" if error is None else f" (standard error {error:.2f})"))
        if final.get("cosine") is not None:
            parts.append(f"cosine {final['cosine']:.6f}")
        state = "written" if self.written else "NOT written"
        return f"{state}: " + ", ".join(parts) + f" [{self.val_samples} samples: {self.data}]"


def _atomic_write(path: Path, write) -> None:
    """``write(binary handle)`` into a temp file beside ``path``, then replace it."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the report ({exc.strerror})") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the report ({exc.strerror})") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _plot(plt, explored: list[dict[str, Any]], title: str):
    """Size (KB) against output SQNR (dB): the allocation path as predicted, and every
    state the search measured."""
    figure, axes = plt.subplots(figsize=(6, 4))
    path = sorted((p for p in explored if p.get("kind") == "predicted"),
                  key=lambda p: p["bytes"])
    axes.plot([p["bytes"] / 1e3 for p in path], [min(p["sqnr_db"], 100.0) for p in path],
              c="tab:gray", label="greedy path, predicted from per-layer sensitivity")
    for ok, colour, label in ((True, "tab:green", "measured: within budget"),
                              (False, "tab:red", "measured: outside budget")):
        points = [p for p in explored if p.get("kind") != "predicted" and
                  p["within_budget"] is ok]
        axes.scatter([p["bytes"] / 1e3 for p in points],
                     [min(p["sqnr_db"], 100.0) for p in points], c=colour, label=label)
    axes.set_xlabel("predicted file size (KB)")
    axes.set_ylabel("output SQNR on calibration data (dB)")
    axes.set_title(f"auto-compress trade-off: {title}")
    axes.legend()
    figure.tight_layout()
    return figure


def _pass_line(rec: PassRecord) -> str:
    m = rec.metrics or {}
    agr = m.get("top1_agreement")
    size = f"{_size(rec.size_before)} -> {_size(rec.size_after)}"
    return (f"{rec.name:<20} {rec.status:<12} {size:>22} {_num(m.get('max_abs')):>9} "
            f"{_num(m.get('cosine'), 6):>9} {'' if agr is None else f'{100 * agr:.1f}%':>9} "
            f"{rec.seconds:>6.1f}s")


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value = float(value)  # numpy floats print like Python floats
    if isinstance(value, float):
        return f"{value:.{digits}g}" if digits == 3 else f"{value:.{digits}f}"
    return str(value)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _plain(value: Any) -> Any:
    """JSON-ready copy of ``value``, recursively.

    Dataclasses become dicts (not through ``dataclasses.asdict``, which rebuilds a
    Counter from (key, count) pairs and so garbles ``declined``), numpy scalars and
    arrays become numbers and lists, paths strings, and Inf/NaN None (JSON has none).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalar or array
        return _plain(value.tolist())
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return str(value)
