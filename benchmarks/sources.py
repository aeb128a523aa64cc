"""Which models the benchmark runs on, and the data each one is measured with.

Three kinds of model, chosen by name:
- shared: ``../shared/models/<name>/model.onnx``, real weights, measured with labels on
  the dataset that fits it (``DATASETS``) and preprocessed by its ``model.preproc.json``;
- light: the real architectures the onnx package ships (``models/light.py``), with
  seeded weights: for size and latency only (seeded random inputs, no labels);
- file: any ``.onnx`` path, with seeded random inputs.

The data always comes from ``onnxslim_cnn.calibration.load_dataset`` with the same
``DataConfig`` (seed 0) that onnxslim_cnn's CLI builds from ``--data/--calib-count/
--val-count/--seed``, so ours and the peers calibrate on the same samples and every tool
is measured on the same other samples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxslim_cnn.calibration import Dataset, load_dataset
from onnxslim_cnn.config import DataConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models"
SEED = 0
# model-name fragment -> dataset folder under shared/models/datasets
DATASETS = (
    ("squeezenet", "imagenet_sample_500"),
    ("efficientnet", "imagenet_sample_500"),
    ("resnet8", "cifar10_test_jpeg_5000"),
    ("mnist", "mnist_test_5000"),
)


@dataclass(frozen=True)
class Source:
    """A model to benchmark and where its data comes from (``data`` None = random)."""

    name: str
    kind: str  # shared | light | file
    path: Path
    data: Path | None

    @property
    def opset(self) -> int:
        model = onnx.load(str(self.path), load_external_data=False)
        return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                   default=0)


def shared_names(shared: Path = SHARED) -> list[str]:
    """Model folders under ``shared`` that hold a ``model.onnx``."""
    if not shared.is_dir():
        return []
    return sorted(p.parent.name for p in shared.glob("*/model.onnx"))


def light_names() -> list[str]:
    """Light model names (``light_<arch>``); empty if ``models/light.py`` is missing."""
    try:
        from models.light import available
    except ImportError:
        return []
    return [f"light_{name}" for name in available()]


def resolve(name: str, shared: Path = SHARED) -> Source:
    """The Source called ``name`` (shared folder, ``light_<arch>``, or an .onnx path).

    Raises:
        LookupError: no such model.
    """
    if (shared / name / "model.onnx").is_file():
        return Source(name, "shared", shared / name / "model.onnx", dataset_for(name, shared))
    if name in light_names():
        from models.light import materialize

        return Source(name, "light", materialize(name), None)
    if name.endswith(".onnx") and Path(name).is_file():
        return Source(Path(name).stem, "file", Path(name).resolve(), None)
    raise LookupError(f"unknown model {name!r}: not in {shared}, not a light model "
                      f"({', '.join(light_names()) or 'models/light.py missing'}), not a file")


def dataset_for(name: str, shared: Path = SHARED) -> Path | None:
    """The labelled dataset folder for shared model ``name``, if one fits."""
    for fragment, folder in DATASETS:
        if fragment in name and (shared / "datasets" / folder).is_dir():
            return shared / "datasets" / folder
    return None


def load(source: Source, calib_count: int, val_count: int, gate_count: int = 0) -> Dataset:
    """The calibration/measurement split of ``source`` (random inputs when no data).

    With real data, the ``gate_count`` samples after the calibration ones are left out of
    the measurement: onnxslim_cnn validates (and backs off) on them, so no tool's row is
    measured on samples that tool tuned or gated on (see ``cli_data_args``).
    """
    gate = gate_count if source.data else 0
    config = DataConfig(path=source.data, calib_count=calib_count,
                        val_count=gate + val_count, seed=SEED)
    data = load_dataset(config, onnx.load(str(source.path)), source.path)
    return _drop_first(data, gate) if gate else data


def _drop_first(data: Dataset, count: int) -> Dataset:
    """``data`` without its first ``count`` validation samples, rebatched alike."""
    size = len(next(iter(data.val[0].values())))
    joined = {name: np.concatenate([b[name] for b in data.val])[count:] for name in data.val[0]}
    total = len(next(iter(joined.values())))
    val = [{name: a[i:i + size] for name, a in joined.items()} for i in range(0, total, size)]
    labels = None if data.val_labels is None else data.val_labels[count:]
    return dataclasses.replace(data, val=val, val_labels=labels)


def cli_data_args(source: Source, calib_count: int, val_count: int,
                  gate_count: int = 0) -> tuple[str, ...]:
    """onnxslim_cnn CLI options: the calibration samples ``load`` uses, and as validation
    the ``gate_count`` samples that ``load`` keeps out of the measurement (with real data
    and a gate; else the measured samples, as for random inputs)."""
    own = gate_count if source.data and gate_count else val_count
    args = ("--calib-count", str(calib_count), "--val-count", str(own),
            "--seed", str(SEED))
    return (("--data", str(source.data)) if source.data else ()) + args


def save_calibration(data: Dataset, path: Path) -> Path:
    """The calibration batches as one ``.npz`` of ``input -> [N, ...]`` for the peers."""
    names = list(data.calib[0])
    np.savez(path, **{n: np.concatenate([b[n] for b in data.calib]) for n in names})
    return path
