"""Calibration and validation inputs: image folders, IDX digits, .npy/.npz, or random.

Samples are shuffled with a seeded permutation and split into a calibration set
(the first ``calib_count``) and a disjoint validation set (the rest, at most
``val_count``), so nothing is ever measured on the data it was tuned on.

Images are turned into model inputs by a spec in the ``model.preproc.json`` format
(found beside the model as ``model.preproc.json`` or ``<stem>.preproc.json``, or given):
resize the short side (bilinear), centre-crop, order channels, then
``(pixel * scale - mean) / std`` per channel. Labels come from a ``labels.tsv``
(``file<TAB>class_index``) in the folder or its parent.

Random inputs (no data given): standard normal floats, integers in [0, 10), shaped
from the model; a dynamic batch axis becomes the batch size, other dynamic axes of a
4-D input become 224, any remaining dynamic axis 1.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
DYNAMIC_BATCH = 16
DEFAULT_SPATIAL = 224


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    @property
    def fixed_batch(self) -> int | None:
        return self.shape[0] if self.shape and isinstance(self.shape[0], int) else None


@dataclass
class Dataset:
    """Batches for calibration and validation, and the validation labels if known."""

    calib: list[dict[str, np.ndarray]]
    val: list[dict[str, np.ndarray]]
    val_labels: np.ndarray | None
    calib_labels: np.ndarray | None
    source: str

    @property
    def calib_count(self) -> int:
        return sum(_batch_len(b) for b in self.calib)

    @property
    def val_count(self) -> int:
        return sum(_batch_len(b) for b in self.val)


def _batch_len(batch: dict[str, np.ndarray]) -> int:
    value = next(iter(batch.values()))
    return int(value.shape[0]) if value.ndim else 1


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of ``model`` (initializers listed as inputs excluded)."""
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        ttype = inp.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in ttype.shape.dim
        )
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        specs.append(InputSpec(inp.name, dtype, dims))
    return specs


def find_preproc(model_path: Path | None) -> Path | None:
    """``model.preproc.json`` or ``<stem>.preproc.json`` beside the model, if any."""
    if model_path is None:
        return None
    for name in ("model.preproc.json", f"{model_path.stem}.preproc.json"):
        candidate = model_path.parent / name
        if candidate.is_file():
            return candidate
    return None


def load_dataset(config, model: onnx.ModelProto, model_path: Path | None = None) -> Dataset:
    """Build the calibration/validation split described by ``config`` (a DataConfig).

    Raises:
        DataError: unreadable data, data that does not fit the model's inputs, or
            images without a preprocessing spec.
    """
    specs = input_specs(model)
    if not specs:
        raise DataError("the model has no inputs to feed")
    rng = np.random.default_rng(config.seed)
    if config.path is None:
        return _random_dataset(specs, config.random_count, rng)
    path = Path(config.path)
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder")
    arrays, labels, source = _read_samples(path, specs, config, model_path, rng)
    return _split(specs, arrays, labels, config, rng, source)


def _read_samples(path, specs, config, model_path, rng):
    if path.suffix == ".npy":
        return _read_npy(path, specs), None, str(path)
    if path.suffix == ".npz":
        return _read_npz(path, specs)
    if path.is_dir() and _idx_files(path)[0] is not None:
        return _read_idx(path, specs, config, model_path)
    if path.is_dir():
        return _read_images(path, specs, config, model_path, rng)
    raise DataError(f"--data {path}: expected an image folder, an IDX folder, .npy or .npz")


def _random_dataset(specs: list[InputSpec], count: int, rng) -> Dataset:
    calib = _random_arrays(specs, count, rng)
    val = _random_arrays(specs, count, rng)
    return Dataset(_batches(specs, calib), _batches(specs, val), None, None,
                   f"random (seeded, {count}+{count} samples)")


def _random_arrays(specs: list[InputSpec], count: int, rng) -> dict[str, np.ndarray]:
    arrays = {}
    for spec in specs:
        shape = (count, *_concrete_dims(spec.shape[1:], len(spec.shape)))
        if np.issubdtype(spec.dtype, np.floating):
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            arrays[spec.name] = rng.random(shape) < 0.5
        else:
            arrays[spec.name] = rng.integers(0, 10, shape).astype(spec.dtype)
    return arrays


def _concrete_dims(dims, rank: int) -> list[int]:
    out = []
    for axis, dim in enumerate(dims, start=1):
        if isinstance(dim, int) and dim > 0:
            out.append(dim)
        else:
            out.append(DEFAULT_SPATIAL if rank == 4 and axis >= 2 else 1)
    return out


def _batches(specs: list[InputSpec], arrays: dict[str, np.ndarray]) -> list[dict]:
    total = next(iter(arrays.values())).shape[0]
    size = specs[0].fixed_batch or DYNAMIC_BATCH
    if total % size and specs[0].fixed_batch:
        raise DataError(f"{total} samples do not fill batches of the model's fixed size {size}")
    return [{k: v[i:i + size] for k, v in arrays.items()} for i in range(0, total, size)]


def _split(specs, arrays, labels, config, rng, source) -> Dataset:
    total = next(iter(arrays.values())).shape[0]
    if total < 2:
        raise DataError(f"{source}: need at least 2 samples (calibration + validation)")
    order = rng.permutation(total)
    n_cal = min(config.calib_count, total // 2) if total <= config.calib_count else config.calib_count
    end = total if config.val_count is None else min(total, n_cal + config.val_count)
    cal_idx, val_idx = order[:n_cal], order[n_cal:end]
    pick = lambda idx: {k: v[idx] for k, v in arrays.items()}  # noqa: E731
    lab = (lambda idx: labels[idx]) if labels is not None else (lambda idx: None)
    return Dataset(_batches(specs, pick(cal_idx)), _batches(specs, pick(val_idx)),
                   lab(val_idx), lab(cal_idx), source)


def _check_shape(spec: InputSpec, array: np.ndarray, what: str) -> np.ndarray:
    want = spec.shape[1:]
    got = array.shape[1:]
    if len(want) != len(got) or any(isinstance(w, int) and w != g for w, g in zip(want, got)):
        raise DataError(f"{what}: samples of shape {list(got)} do not fit input "
                        f"'{spec.name}' {list(spec.shape)}")
    return array.astype(spec.dtype, copy=False)


def _read_npy(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    if len(specs) != 1:
        raise DataError(f"{path}: a .npy feeds one input; the model has {len(specs)} (use .npz)")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    return {specs[0].name: _check_shape(specs[0], array, str(path))}


def _read_npz(path: Path, specs: list[InputSpec]):
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    with archive:
        keys = [k for k in archive.files if k != "labels"]
        if len(specs) == 1 and len(keys) == 1:
            arrays = {specs[0].name: archive[keys[0]]}
        else:
            missing = [s.name for s in specs if s.name not in archive.files]
            if missing:
                raise DataError(f"{path}: no array for input(s) {missing}")
            arrays = {s.name: archive[s.name] for s in specs}
        labels = archive["labels"].astype(np.int64) if "labels" in archive.files else None
    arrays = {s.name: _check_shape(s, arrays[s.name], str(path)) for s in specs}
    return arrays, labels, str(path)


def load_preproc(config, model_path: Path | None, what: str) -> dict:
    spec_path = config.preproc or find_preproc(model_path)
    if spec_path is None:
        raise DataError(f"{what}: images need a preprocessing spec: put model.preproc.json "
                        "beside the model or pass --preproc FILE")
    try:
        return json.loads(Path(spec_path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{spec_path}: cannot read preprocessing spec ({exc})") from exc


def _image_files(path: Path) -> tuple[list[Path], dict[str, int] | None]:
    folder = path / "images" if (path / "images").is_dir() else path
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for tsv in (folder / "labels.tsv", folder.parent / "labels.tsv"):
        if tsv.is_file():
            return files, _read_labels(tsv)
    return files, None


def _read_labels(tsv: Path) -> dict[str, int]:
    labels = {}
    for line in tsv.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        try:
            labels[fields[0]] = int(fields[1])
        except (IndexError, ValueError) as exc:
            raise DataError(f"{tsv}: bad line {line[:80]!r}") from exc
    return labels


def _read_images(path, specs, config, model_path, rng):
    if len(specs) != 1:
        raise DataError(f"{path}: images feed one input; the model has {len(specs)}")
    files, labels = _image_files(path)
    if not files:
        raise DataError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    prep = load_preproc(config, model_path, str(path))
    wanted = config.calib_count + (config.val_count if config.val_count is not None else len(files))
    files = [files[i] for i in np.sort(rng.permutation(len(files))[:wanted])]
    spec = specs[0]
    images = np.stack([preprocess(_open_image(f, spec), prep, spec) for f in files])
    label_array = None
    if labels is not None:
        missing = [f.name for f in files if f.name not in labels]
        if missing:
            raise DataError(f"{path}: no label for {missing[0]} in labels.tsv")
        label_array = np.array([labels[f.name] for f in files], dtype=np.int64)
    return {spec.name: _check_shape(spec, images, str(path))}, label_array, str(path)


def _layout(spec: InputSpec) -> tuple[str, int]:
    """('NCHW' or 'NHWC', channels) of an image input."""
    if len(spec.shape) != 4:
        raise DataError(f"input '{spec.name}' {list(spec.shape)} is not an image batch")
    if spec.shape[1] in (1, 3):
        return "NCHW", spec.shape[1]
    if spec.shape[3] in (1, 3):
        return "NHWC", spec.shape[3]
    raise DataError(f"input '{spec.name}' {list(spec.shape)}: cannot tell the channel axis")


def _open_image(path: Path, spec: InputSpec):
    from PIL import Image

    _, channels = _layout(spec)
    try:
        with Image.open(path) as img:
            return img.convert("L" if channels == 1 else "RGB")
    except OSError as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from exc


def preprocess(img, prep: dict, spec: InputSpec) -> np.ndarray:
    """One PIL image -> one sample (no batch axis) for ``spec``, following ``prep``."""
    from PIL import Image

    layout, channels = _layout(spec)
    resize = int(prep.get("resize", 0) or 0)
    if resize:
        w, h = img.size
        ratio = resize / min(w, h)
        img = img.resize((max(1, round(w * ratio)), max(1, round(h * ratio))),
                         Image.Resampling.BILINEAR)
    crop = int(prep.get("crop", 0) or 0)
    if crop:
        w, h = img.size
        left, top = (w - crop) // 2, (h - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
    pixels = np.asarray(img, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if prep.get("channel_order", "RGB").upper() == "BGR" and channels == 3:
        pixels = pixels[:, :, ::-1]
    return _normalise(pixels, prep, channels, layout)


def _normalise(pixels: np.ndarray, prep: dict, channels: int, layout: str) -> np.ndarray:
    scale = float(prep.get("scale", 1.0 / 255.0))
    mean = np.asarray(prep.get("mean", [0.0] * channels), dtype=np.float32)[:channels]
    std = np.asarray(prep.get("std", [1.0] * channels), dtype=np.float32)[:channels]
    out = (pixels * scale - mean) / std
    return out.transpose(2, 0, 1) if layout == "NCHW" else out


def _idx_files(path: Path) -> tuple[Path | None, Path | None]:
    images = sorted(path.glob("*idx3-ubyte*"))
    labels = sorted(path.glob("*idx1-ubyte*"))
    return (images[0] if images else None), (labels[0] if labels else None)


def _read_idx_file(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from exc
    ndim = raw[3]
    dims = np.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4").astype(int)
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)


def _read_idx(path, specs, config, model_path):
    """MNIST-style IDX: images [N, H, W] uint8, optional labels [N]."""
    image_file, label_file = _idx_files(path)
    spec = specs[0]
    prep = {"scale": 1.0 / 255.0}
    found = config.preproc or find_preproc(model_path)
    if found is not None:
        prep = load_preproc(config, model_path, str(path))
    pixels = _read_idx_file(image_file).astype(np.float32)[..., None]
    layout, _ = _layout(spec)
    images = np.stack([_normalise(p, prep, 1, layout) for p in pixels])
    labels = _read_idx_file(label_file).astype(np.int64) if label_file else None
    return {spec.name: _check_shape(spec, images, str(path))}, labels, str(path)
