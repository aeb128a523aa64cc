"""The run report: per-pass records, final metrics, JSON and a text table."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


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

    @property
    def ratio(self) -> float:
        return self.size_in / self.size_out if self.size_out else 0.0

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self) | {"ratio": self.ratio})

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

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
            parts.append(f"top-1 drop {final['top1_drop']:.2f} pt")
        if final.get("cosine") is not None:
            parts.append(f"cosine {final['cosine']:.6f}")
        state = "written" if self.written else "NOT written"
        return f"{state}: " + ", ".join(parts) + f" [{self.val_samples} samples: {self.data}]"


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
    if isinstance(value, float):
        return f"{value:.{digits}g}" if digits == 3 else f"{value:.{digits}f}"
    return str(value)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _finite(value: Any) -> Any:
    """JSON has no Inf/NaN: replace them by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
