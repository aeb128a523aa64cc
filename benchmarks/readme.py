"""Write the README's result tables from the benchmark results files: no figure by hand.

    python benchmarks/readme.py            # rewrite the marked tables of README.md
    python benchmarks/readme.py --check    # exit 1 when they differ from the results

A table is the lines between ``<!-- results:NAME -->`` and ``<!-- /results -->`` in
README.md; NAME is one of ``TABLES``, each written from one results file: the main run's
``results.json`` or a run under other conditions kept in its own folder (``CALIB2000``:
ResNet-8 calibrated on 2000 images, which the main tables' 100-image split cannot hold
beside them). Run it after ``benchmarks/run.py`` has rewritten a results file; a test
checks that the committed README matches the committed results.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
RESULTS = HERE / "results.json"
# python benchmarks/run.py --models resnet8_cifar10_mlperf_tiny --calib-count 2000
#     --val-count 2900 --gate-count 100 --out benchmarks/calib2000 --tools ...
CALIB2000 = HERE / "calib2000" / "results.json"

MODELS = {"resnet8_cifar10_mlperf_tiny": "resnet8", "squeezenet1.1_caffe2_fp32": "squeezenet1.1",
          "efficientnet_lite0": "efficientnet_lite0"}
MINUS = "\u2212"


def _delta(row: dict) -> str:
    value = row.get("delta_top1")
    if value is None:
        return "—"
    text = f"{value:+.1f}".replace("-", MINUS)
    return "0.0" if text in ("+0.0", f"{MINUS}0.0") else text


def _agree(row: dict) -> str:
    value = row.get("top1_agreement")
    return "—" if value is None else f"{100 * value:.1f} %"


def _size(row: dict) -> str:
    return "—" if row.get("size_ratio") is None else f"{row['size_ratio']:.3f}"


def _cosine(row: dict) -> str:
    return "—" if row.get("cosine") is None else f"{row['cosine']:.3f}"


def _seconds(row: dict) -> str:
    return "—" if row.get("tool_s") is None else f"{row['tool_s']:.0f} s"


def _latency(row: dict) -> str:
    ratio = row.get("latency", {}).get("1", {}).get("ratio")
    return "—" if ratio is None else f"{ratio:.2f}"


def _convs(row: dict) -> str:
    if row.get("int8_convs") is None:
        return "—"
    return f"{row['int8_convs']}/{row['int8_convs'] + row['float_convs']}"


def _measured(row: dict | None) -> bool:
    return row is not None and row.get("status") == "ok"


class Results:
    """The rows of results.json by model and tool."""

    def __init__(self, results: dict):
        self.rows = {m["name"]: {r["tool"]: r for r in m["rows"]} for m in results["models"]}

    def row(self, model: str, tool: str) -> dict | None:
        row = self.rows.get(model, {}).get(tool)
        return row if _measured(row) else None


def _cells(results: Results, tool: str, cell: Callable[[dict], str]) -> list[str]:
    """One cell per model of MODELS for ``tool`` ("—" where it was not measured)."""
    return [cell(row) if (row := results.row(model, tool)) else "—" for model in MODELS]


def _int8(results: Results) -> list[str]:
    names = {"ours-int8": "`--preset int8`",
             "ort-static-minmax": "onnxruntime `quantize_static` (MinMax)",
             "nncf": "NNCF `nncf.quantize`"}
    lines = ["| model | tool | size × fp32 | Δtop-1 | top-1 agreement | latency × fp32 | "
             "int8 convs |", "|---|---|---|---|---|---|---|"]
    for model, short in MODELS.items():
        first = True
        for tool, name in names.items():
            row = results.row(model, tool)
            if row is None:
                continue
            suffix = row["label"][len(tool):]
            lines.append(f"| {short if first else ''} | {name}{suffix} | {_size(row)} | "
                         f"{_delta(row)} | {_agree(row)} | {_latency(row)} | {_convs(row)} |"
                         .replace("|  |", "| |"))
            first = False
    return lines


def _auto(results: Results) -> list[str]:
    commands = {"ours-safe": "default (`safe`)", "ours-balanced": "`--preset balanced`",
                "ours-max": "`--preset max`",
                "ours-max-top1": "`--preset max --max-top1-drop 1`"}
    lines = ["| model | command | size × fp32 | Δtop-1 | top-1 agreement | time |",
             "|---|---|---|---|---|---|"]
    for model, short in MODELS.items():
        for tool, command in commands.items():
            row = results.row(model, tool)
            if row is None:
                continue
            size = f"{_size(row)} ({1 / row['size_ratio']:.2f}x)"
            lines.append(f"| {short} | {command} | {size} | {_delta(row)} | {_agree(row)} | "
                         f"{_seconds(row)} |")
    return lines


def _cluster(results: Results) -> list[str]:
    settings = {**{f"ours-cluster{b}": str(b) for b in (8, 6, 5, 4, 3)},
                "ours-cluster-avg5": "`--avg-bits 5`", "ours-cluster-avg4": "`--avg-bits 4`",
                "ours-cluster-avg4-kd": "`--avg-bits 4 --distill-steps 300`",
                "ours-cluster-avg4-half": "`--avg-bits 4` + `half-constants`",
                "ours-cluster-avg4-int8": "`--avg-bits 4` + `qdq-int8`"}
    head = " | ".join(f"{short}: size / Δtop-1 / agreement" for short in MODELS.values())
    lines = [f"| bits | {head} |", "|---|---|---|---|"]
    for tool, name in settings.items():
        def cell(row: dict, int8: bool = tool.endswith("-int8")) -> str:
            text = f"{_size(row)} / {_delta(row)} / {_agree(row)}"
            if int8:
                text += f"; {_convs(row)} int8 convs, {_latency(row)}x fp32 latency"
            return text
        lines.append(f"| {name} | " + " | ".join(_cells(results, tool, cell)) + " |")
    return lines


def _prune(results: Results) -> list[str]:
    rows = {"ours-prune30": "`ours-prune30` (`--sparsity 0.3`)",
            "ours-prune50": "`ours-prune50`",
            "ours-prune70": "`ours-prune70` (`--sparsity 0.7`)",
            "ours-prune50-net": "`ours-prune50-net` (`--allocation network`)",
            "ours-prune50-kd": "`ours-prune50-kd` (`--distill-steps 300`)",
            "ours-prune50-cluster4": "`ours-prune50-cluster4`",
            "ours-channels25": "`ours-channels25`"}
    lines = ["| row | " + " | ".join(MODELS.values()) + " |", "|---|---|---|---|"]
    for tool, name in rows.items():
        def cell(row: dict) -> str:
            return f"{_size(row)} / {_delta(row)} / {_agree(row)} / {_cosine(row)}"
        lines.append(f"| {name} | " + " | ".join(_cells(results, tool, cell)) + " |")
    return lines


def _one_model(model: str) -> Callable[[Results], list[str]]:
    """Every measured row of ``model``, one line each (a run of a single model)."""
    def lines(results: Results) -> list[str]:
        out = ["| tool | size × fp32 | Δtop-1 | top-1 agreement | cosine | tool time |",
               "|---|---|---|---|---|---|"]
        for tool, row in results.rows.get(model, {}).items():
            if not _measured(row) or tool == "fp32":
                continue
            out.append(f"| `{tool}` | {_size(row)} ({1 / row['size_ratio']:.2f}x) | "
                       f"{_delta(row)} | {_agree(row)} | {_cosine(row)} | {_seconds(row)} |")
        return out
    return lines


# table name -> (lines from the results, the results file they come from)
TABLES: dict[str, tuple[Callable[[Results], list[str]], Path]] = {
    "int8": (_int8, RESULTS), "auto": (_auto, RESULTS), "cluster": (_cluster, RESULTS),
    "prune": (_prune, RESULTS),
    "prune2000": (_one_model("resnet8_cifar10_mlperf_tiny"), CALIB2000)}
BLOCK = re.compile(r"(<!-- results:(\w+) -->\n)(.*?)(<!-- /results -->)", re.S)


def load() -> dict[Path, dict]:
    """Every results file a table reads, by path."""
    return {path: json.loads(path.read_text()) for path in {p for _, p in TABLES.values()}}


def render(readme: str, results: dict[Path, dict]) -> str:
    """``readme`` with every marked table written from its results file's content."""
    rows = {path: Results(content) for path, content in results.items()}

    def table(match: re.Match) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise SystemExit(f"README.md: unknown results table {name!r}; known: "
                             f"{', '.join(TABLES)}")
        lines, path = TABLES[name]
        return match.group(1) + "\n".join(lines(rows[path])) + "\n" + match.group(4)

    return BLOCK.sub(table, readme)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/readme.py", description=__doc__.splitlines()[0])
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--check", action="store_true", help="exit 1 when README.md is stale")
    args = p.parse_args(argv)
    text = args.readme.read_text()
    new = render(text, load())
    if args.check:
        if new != text:
            print(f"{args.readme}: result tables differ from the results files; run "
                  "python benchmarks/readme.py", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
