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
from the model; a dynamic batch axis becomes the batch size, the dynamic spatial axes
of a 4-D input become 224 (H, W of NCHW, or of NHWC when the last axis is 1 or 3). Any
other dynamic axis (channels, features, sequence length) is refused with a request for
``--data``: a guess such as 1 either fails inside onnxruntime with a message about a
Conv, or validates the compression on degenerate inputs.

A model with a fixed batch size gets whole batches only: random counts are rounded up
to a multiple of it, and a split of real data drops the remainder that does not fill
a batch.
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
    model_path = Path(model_path)
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
    arrays, labels, source, ordered = _read_samples(path, specs, config, model_path, rng)
    return _split(specs, arrays, labels, config, None if ordered else rng, source)


def _read_samples(path, specs, config, model_path, rng):
    """(arrays, labels, source, ordered); ordered: the samples already come in the seeded
    split order (an image folder reads only the files it needs, in that order)."""
    if path.suffix == ".npy":
        return _read_npy(path, specs), None, str(path), False
    if path.suffix == ".npz":
        return (*_read_npz(path, specs), False)
    if path.is_dir() and _idx_files(path)[0] is not None:
        return (*_read_idx(path, specs, config, model_path), False)
    if path.is_dir():
        return (*_read_images(path, specs, config, model_path, rng), True)
    raise DataError(f"--data {path}: expected an image folder, an IDX folder, .npy or .npz")


def _random_dataset(specs: list[InputSpec], count: int, rng) -> Dataset:
    fixed = specs[0].fixed_batch
    if fixed:
        count = -(-count // fixed) * fixed
    calib = _random_arrays(specs, count, rng)
    val = _random_arrays(specs, count, rng)
    return Dataset(_batches(specs, calib), _batches(specs, val), None, None,
                   f"random (seeded, {count}+{count} samples)")


def _random_arrays(specs: list[InputSpec], count: int, rng) -> dict[str, np.ndarray]:
    arrays = {}
    for spec in specs:
        shape = (count, *_concrete_dims(spec))
        if np.issubdtype(spec.dtype, np.floating):
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            arrays[spec.name] = rng.random(shape) < 0.5
        else:
            arrays[spec.name] = rng.integers(0, 10, shape).astype(spec.dtype)
    return arrays


def _concrete_dims(spec: InputSpec) -> list[int]:
    """Sizes for every axis after the batch axis (see the module docstring).

    Raises:
        DataError: a dynamic axis that is neither the batch axis nor H/W of a 4-D input.
    """
    spatial = _spatial_axes(spec.shape)
    dims = []
    for axis, dim in enumerate(spec.shape[1:], start=1):
        if isinstance(dim, int) and dim > 0:
            dims.append(dim)
        elif axis in spatial:
            dims.append(DEFAULT_SPATIAL)
        else:
            label = f" ('{dim}')" if isinstance(dim, str) else ""
            raise DataError(f"random inputs cannot choose a size for axis {axis}{label} of "
                            f"input '{spec.name}' (only the batch axis and H, W of a 4-D "
                            "input get one): pass --data with real inputs")
    return dims


def _spatial_axes(shape: tuple) -> tuple[int, ...]:
    if len(shape) != 4:
        return ()
    nhwc = shape[3] in (1, 3) and shape[1] not in (1, 3)
    return (1, 2) if nhwc else (2, 3)


def _batches(specs: list[InputSpec], arrays: dict[str, np.ndarray]) -> list[dict]:
    total = next(iter(arrays.values())).shape[0]
    size = specs[0].fixed_batch or DYNAMIC_BATCH
    if specs[0].fixed_batch:
        total -= total % size  # a fixed-batch model takes whole batches only
    return [{k: v[i:i + size] for k, v in arrays.items()} for i in range(0, total, size)]


def _split(specs, arrays, labels, config, rng, source) -> Dataset:
    """Disjoint calibration and validation sets from one seeded permutation of the
    samples (``rng`` None: ``arrays`` already come in that order): calibration = its
    first ``calib_count`` samples, validation = the next ``val_count``.

    The split is prefix-stable: the same seed with other counts draws from the same
    order. So a larger validation set extends a smaller one, and ``--check`` with
    ``--calib-count`` = a run's calibration + validation counts measures only samples
    that run never read."""
    total = _sample_count(arrays, labels, source)
    batch = specs[0].fixed_batch or 1
    if total < 2 * batch:
        raise DataError(f"{source}: {total} samples; need at least {2 * batch} "
                        "(calibration + validation)")
    if config.val_count is not None and config.val_count < 1:
        raise DataError("val_count must be at least 1")
    order = np.arange(total) if rng is None else rng.permutation(total)
    n_cal = config.calib_count if total > config.calib_count else total // 2
    n_cal = max(batch, n_cal - n_cal % batch)
    n_val = total - n_cal if config.val_count is None else min(total - n_cal, config.val_count)
    n_val -= n_val % batch
    if n_val < 1:
        raise DataError(f"{source}: no samples left for validation after {n_cal} "
                        f"for calibration (batches of {batch})")
    cal_idx, val_idx = order[:n_cal], order[n_cal:n_cal + n_val]
    pick = lambda idx: {k: v[idx] for k, v in arrays.items()}  # noqa: E731
    lab = (lambda idx: labels[idx]) if labels is not None else (lambda idx: None)
    return Dataset(_batches(specs, pick(cal_idx)), _batches(specs, pick(val_idx)),
                   lab(val_idx), lab(cal_idx), source)


def _sample_count(arrays: dict[str, np.ndarray], labels, source: str) -> int:
    counts = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"{source}: inputs have different sample counts {counts}")
    total = next(iter(counts.values()))
    if labels is not None and len(labels) != total:
        raise DataError(f"{source}: {len(labels)} labels for {total} samples")
    return total


def _check_shape(spec: InputSpec, array: np.ndarray, what: str) -> np.ndarray:
    want = spec.shape[1:]
    got = array.shape[1:]
    if array.ndim == 0 or len(want) != len(got) or \
            any(isinstance(w, int) and w != g for w, g in zip(want, got, strict=True)):
        raise DataError(f"{what}: samples of shape {list(got)} do not fit input "
                        f"'{spec.name}' {list(spec.shape)}")
    return array.astype(spec.dtype, copy=False)


def _read_npy(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    if len(specs) != 1:
        raise DataError(f"{path}: a .npy feeds one input; the model has {len(specs)} (use .npz)")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: not a .npy array (an .npz archive renamed?)")
    return {specs[0].name: _check_shape(specs[0], array, str(path))}


def _read_npz(path: Path, specs: list[InputSpec]):
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: not an .npz archive")
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
    """The preprocessing spec (given, or found beside the model), checked.

    Raises:
        DataError: no spec, unreadable JSON, or fields of the wrong type.
    """
    spec_path = config.preproc or find_preproc(model_path)
    if spec_path is None:
        raise DataError(f"{what}: images need a preprocessing spec: put model.preproc.json "
                        "beside the model or pass --preproc FILE")
    try:
        prep = json.loads(Path(spec_path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{spec_path}: cannot read preprocessing spec ({exc})") from exc
    return _check_preproc(prep, spec_path)


def _check_preproc(prep, spec_path) -> dict:
    if not isinstance(prep, dict):
        raise DataError(f"{spec_path}: a preprocessing spec is a JSON object")
    try:
        for key in ("resize", "crop"):
            if int(prep.get(key, 0) or 0) < 0:
                raise ValueError(f"{key} is negative")
        float(prep.get("scale", 1.0))
        for key in ("mean", "std"):
            np.asarray(prep.get(key, 0.0), dtype=np.float32)
        if not np.min(np.asarray(prep.get("std", 1.0), dtype=np.float32)) > 0:
            raise ValueError("std must be positive")
    except (TypeError, ValueError) as exc:
        raise DataError(f"{spec_path}: bad preprocessing spec ({exc})") from exc
    if str(prep.get("channel_order", "RGB")).upper() not in ("RGB", "BGR"):
        raise DataError(f"{spec_path}: channel_order must be RGB or BGR")
    return prep


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
    files = [files[i] for i in rng.permutation(len(files))[:wanted]]  # the split order
    spec = specs[0]
    images = _stack([preprocess(_open_image(f, spec), prep, spec) for f in files], files)
    label_array = None
    if labels is not None:
        missing = [f.name for f in files if f.name not in labels]
        if missing:
            raise DataError(f"{path}: no label for {missing[0]} in labels.tsv")
        label_array = np.array([labels[f.name] for f in files], dtype=np.int64)
    return {spec.name: _check_shape(spec, images, str(path))}, label_array, str(path)


def _stack(samples: list[np.ndarray], files: list[Path]) -> np.ndarray:
    first = samples[0].shape
    for path, sample in zip(files, samples, strict=True):
        if sample.shape != first:
            raise DataError(f"{path}: preprocessed to {list(sample.shape)} but "
                            f"{files[0].name} to {list(first)}; give the spec a 'crop' "
                            "so that every image has the same size")
    return np.stack(samples)


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
    scale = np.float32(prep.get("scale", 1.0 / 255.0))
    # a scalar applies to every channel; a grayscale model takes the first entry
    mean = np.atleast_1d(np.asarray(prep.get("mean", 0.0), dtype=np.float32))[:channels]
    std = np.atleast_1d(np.asarray(prep.get("std", 1.0), dtype=np.float32))[:channels]
    out = (pixels * scale - mean) / std
    return out.transpose(2, 0, 1) if layout == "NCHW" else out


def _idx_files(path: Path) -> tuple[Path | None, Path | None]:
    images = sorted(path.glob("*idx3-ubyte*"))
    labels = sorted(path.glob("*idx1-ubyte*"))
    return (images[0] if images else None), (labels[0] if labels else None)


def _read_idx_file(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file: magic 00 00 08 ndim, ndim big-endian sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or len(raw) < 4 + 4 * raw[3]:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad header)")
    ndim = raw[3]
    dims = np.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4").astype(np.int64)
    data = np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: {data.size} bytes of data for shape {dims.tolist()}")
    return data.reshape(dims)


def _read_idx(path, specs, config, model_path):
    """MNIST-style IDX: images [N, H, W] uint8, optional labels [N]."""
    image_file, label_file = _idx_files(path)
    if len(specs) != 1:
        raise DataError(f"{path}: IDX images feed one input; the model has {len(specs)}")
    spec = specs[0]
    prep = {"scale": 1.0 / 255.0}
    found = config.preproc or find_preproc(model_path)
    if found is not None:
        prep = load_preproc(config, model_path, str(path))
    pixels = _read_idx_file(image_file).astype(np.float32)
    if pixels.ndim != 3:
        raise DataError(f"{image_file}: IDX images must be [N, H, W], got {list(pixels.shape)}")
    pixels = pixels[..., None]
    layout, _ = _layout(spec)
    images = np.stack([_normalise(p, prep, 1, layout) for p in pixels])
    labels = _read_idx_file(label_file).astype(np.int64) if label_file else None
    return {spec.name: _check_shape(spec, images, str(path))}, labels, str(path)
