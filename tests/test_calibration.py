"""Calibration/validation data: random inputs, .npy/.npz, image folders, IDX, the split.

Samples are made identifiable (sample i is filled with the value i) so that tests can
check which samples went where and that labels stay with their samples.
"""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
from PIL import Image

from onnxslim_cnn.calibration import input_specs, load_dataset, preprocess
from onnxslim_cnn.config import DataConfig
from onnxslim_cnn.errors import DataError
from onnxslim_cnn.validate import run_model

from .helpers import make_model, shared_dataset, shared_model


def identity_model(*inputs: str):
    """``y_k = Identity(x_k)`` for inputs given as ONNX text types ("float[N, 3, 4, 4]")."""
    args = ", ".join(f"{t} x{k}" for k, t in enumerate(inputs))
    outs = ", ".join(f"{t} y{k}" for k, t in enumerate(inputs))
    body = "\n".join(f"y{k} = Identity (x{k})" for k in range(len(inputs)))
    return make_model(f'<ir_version: 8, opset_import: ["" : 13]>\n'
                      f"g ({args}) => ({outs}) {{\n{body}\n}}")


def ids(batches, name="x0") -> list[int]:
    """The sample ids (value of the first element) of every sample in ``batches``."""
    return [int(round(float(s.flat[0]))) for b in batches for s in b[name]]


def numbered(count: int, shape) -> np.ndarray:
    return np.stack([np.full(shape, i, dtype=np.float32) for i in range(count)])


# --- random inputs ------------------------------------------------------------------

def test_random_dynamic_batch_and_spatial_axes():
    model = identity_model("float[N, 3, H, W]")
    data = load_dataset(DataConfig(random_count=40, seed=1), model)
    assert [b["x0"].shape for b in data.calib] == [(16, 3, 224, 224), (16, 3, 224, 224),
                                                  (8, 3, 224, 224)]
    assert data.calib_count == data.val_count == 40
    assert data.calib[0]["x0"].dtype == np.float32
    assert not np.array_equal(data.calib[0]["x0"], data.val[0]["x0"])
    assert data.val_labels is None and data.source.startswith("random")


def test_random_nhwc_dynamic_spatial_axes_become_224():
    data = load_dataset(DataConfig(random_count=2), identity_model("float[N, H, W, 3]"))
    assert data.calib[0]["x0"].shape == (2, 224, 224, 3)


def test_random_fixed_batch_rounds_count_up():
    data = load_dataset(DataConfig(random_count=8), identity_model("float[3, 2]"))
    assert [b["x0"].shape for b in data.calib] == [(3, 2)] * 3  # 8 -> 9 samples
    data = load_dataset(DataConfig(random_count=8), identity_model("float[1, 1, 5, 5]"))
    assert [b["x0"].shape for b in data.val] == [(1, 1, 5, 5)] * 8


def test_random_dtypes_follow_the_model():
    model = identity_model("float16[N, 3, 8, 8]", "int64[N, 4]", "bool[N]")
    batch = load_dataset(DataConfig(random_count=4), model).calib[0]
    assert batch["x0"].dtype == np.float16 and batch["x0"].shape == (4, 3, 8, 8)
    assert batch["x1"].dtype == np.int64 and set(np.unique(batch["x1"])) <= set(range(10))
    assert batch["x2"].dtype == np.bool_ and batch["x2"].shape == (4,)
    assert run_model(model, [batch])["y0"].dtype == np.float16  # onnxruntime accepts them


def test_random_is_deterministic_per_seed():
    model = identity_model("float[N, 4]")
    a, b, c = (load_dataset(DataConfig(seed=s), model) for s in (5, 5, 6))
    np.testing.assert_array_equal(a.calib[0]["x0"], b.calib[0]["x0"])
    assert not np.array_equal(a.calib[0]["x0"], c.calib[0]["x0"])


# --- .npy / .npz and the split -------------------------------------------------------

def test_npy_split_is_disjoint_complete_and_seeded(tmp_path):
    np.save(tmp_path / "d.npy", numbered(30, (2, 2)))
    model = identity_model("float[N, 2, 2]")
    split = lambda seed: load_dataset(  # noqa: E731
        DataConfig(path=tmp_path / "d.npy", calib_count=10, seed=seed), model)
    a, b, c = split(0), split(0), split(1)
    cal, val = ids(a.calib), ids(a.val)
    assert len(cal) == 10 and len(val) == 20
    assert not set(cal) & set(val) and sorted(cal + val) == list(range(30))
    assert (ids(b.calib), ids(b.val)) == (cal, val)
    assert ids(c.calib) != cal
    assert a.calib_labels is None and a.val_labels is None


def test_npy_val_count_and_small_sets(tmp_path):
    np.save(tmp_path / "d.npy", numbered(30, (2,)))
    model = identity_model("float[N, 2]")
    data = load_dataset(DataConfig(path=tmp_path / "d.npy", calib_count=10, val_count=5), model)
    assert (data.calib_count, data.val_count) == (10, 5)
    # fewer samples than calib_count: half calibrate, half validate, still disjoint
    data = load_dataset(DataConfig(path=tmp_path / "d.npy", calib_count=100), model)
    assert (data.calib_count, data.val_count) == (15, 15)
    assert not set(ids(data.calib)) & set(ids(data.val))


def test_npy_fixed_batch_keeps_whole_batches(tmp_path):
    np.save(tmp_path / "d.npy", numbered(11, (2,)))
    data = load_dataset(DataConfig(path=tmp_path / "d.npy", calib_count=5),
                        identity_model("float[2, 2]"))
    assert [b["x0"].shape[0] for b in data.calib + data.val] == [2, 2, 2, 2, 2]
    assert not set(ids(data.calib)) & set(ids(data.val))


def test_npz_labels_stay_with_their_samples(tmp_path):
    samples = numbered(20, (3,))
    np.savez(tmp_path / "d.npz", anything=samples, labels=np.arange(20) + 100)
    data = load_dataset(DataConfig(path=tmp_path / "d.npz", calib_count=8),
                        identity_model("float[N, 3]"))
    assert data.val_labels.tolist() == [i + 100 for i in ids(data.val)]
    assert data.calib_labels.tolist() == [i + 100 for i in ids(data.calib)]


def test_npz_feeds_inputs_by_name(tmp_path):
    np.savez(tmp_path / "d.npz", x0=numbered(6, (2,)), x1=numbered(6, (3,)) + 0.25)
    data = load_dataset(DataConfig(path=tmp_path / "d.npz", calib_count=2),
                        identity_model("float[N, 2]", "float[N, 3]"))
    batch = data.val[0]
    np.testing.assert_array_equal(batch["x1"][:, 0], batch["x0"][:, 0] + 0.25)  # aligned


@pytest.mark.parametrize("arrays, message", [
    ({"x0": numbered(6, (2,))}, r"no array for input\(s\) \['x1'\]"),
    ({"x0": numbered(6, (2,)), "x1": numbered(5, (3,))}, "different sample counts"),
    ({"x0": numbered(6, (2,)), "x1": numbered(6, (3,)), "labels": np.arange(5)},
     "5 labels for 6 samples"),
], ids=["missing_input", "uneven_counts", "label_count"])
def test_npz_bad_archive_raises_data_error(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(path=tmp_path / "d.npz"),
                     identity_model("float[N, 2]", "float[N, 3]"))


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "none.npy", "no such file or folder"),
    (lambda p: (p / "d.txt").write_text("1 2 3") and p / "d.txt", "expected an image folder"),
    (lambda p: np.save(p / "d.npy", numbered(4, (5,))) or p / "d.npy", "do not fit input"),
    (lambda p: np.save(p / "d.npy", numbered(1, (2,))) or p / "d.npy", "need at least 2"),
    (lambda p: (p / "d.npy").write_bytes(b"\x93NUMPY garbage") and p / "d.npy", "cannot read"),
], ids=["missing", "unknown_suffix", "wrong_shape", "one_sample", "corrupt_npy"])
def test_bad_data_path_raises_data_error(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(path=path), identity_model("float[N, 2]"))


def test_npy_cannot_feed_two_inputs(tmp_path):
    np.save(tmp_path / "d.npy", numbered(4, (2,)))
    with pytest.raises(DataError, match="use .npz"):
        load_dataset(DataConfig(path=tmp_path / "d.npy"),
                     identity_model("float[N, 2]", "float[N, 2]"))


# --- preprocessing ------------------------------------------------------------------

def rgb_ramp(width: int, height: int) -> Image.Image:
    """R = 10*column, G = 10*row, B = 7 everywhere."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = 10 * np.arange(width)[None, :]
    pixels[..., 1] = 10 * np.arange(height)[:, None]
    pixels[..., 2] = 7
    return Image.fromarray(pixels, "RGB")


def spec_of(text: str):
    return input_specs(identity_model(text))[0]


def test_preprocess_crop_bgr_mean_std_nchw_exact():
    prep = {"resize": 0, "crop": 2, "channel_order": "BGR", "scale": 1.0,
            "mean": [1.0, 2.0, 3.0], "std": [2.0, 4.0, 8.0]}
    out = preprocess(rgb_ramp(6, 4), prep, spec_of("float[N, 3, 2, 2]"))
    # centre crop of 6x4 to 2x2: columns 2..3, rows 1..2; channels become B, G, R
    b = np.full((2, 2), 7.0)
    g = np.array([[10.0, 10.0], [20.0, 20.0]])
    r = np.array([[20.0, 30.0], [20.0, 30.0]])
    expected = np.stack([(b - 1) / 2, (g - 2) / 4, (r - 3) / 8]).astype(np.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


def test_preprocess_nhwc_default_scale():
    out = preprocess(rgb_ramp(2, 2), {"crop": 0}, spec_of("float[N, 2, 2, 3]"))
    assert out.shape == (2, 2, 3)
    np.testing.assert_allclose(out[1, 1], [10 / 255, 10 / 255, 7 / 255], rtol=1e-6)


def test_preprocess_scalar_mean_and_std_apply_to_every_channel():
    out = preprocess(rgb_ramp(2, 2), {"scale": 1, "mean": 7, "std": 0.5},
                     spec_of("float[N, 3, 2, 2]"))
    np.testing.assert_array_equal(out[2], np.zeros((2, 2), np.float32))  # (7 - 7) / 0.5
    np.testing.assert_array_equal(out[0], [[-14.0, 6.0], [-14.0, 6.0]])


def test_preprocess_grayscale_single_channel():
    gray = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 10, "L")
    out = preprocess(gray, {"scale": 1.0, "mean": [5.0], "std": [5.0], "crop": 2},
                     spec_of("float[N, 1, 2, 2]"))
    np.testing.assert_array_equal(out, [[[(50 - 5) / 5, (60 - 5) / 5],
                                         [(90 - 5) / 5, (100 - 5) / 5]]])


def test_preprocess_resize_short_side_bilinear_then_crop():
    img = rgb_ramp(8, 16)  # short side 8 -> 4: 4 x 8 image, bilinear
    out = preprocess(img, {"resize": 4, "crop": 4, "scale": 1.0}, spec_of("float[N, 3, 4, 4]"))
    resized = np.asarray(img.resize((4, 8), Image.Resampling.BILINEAR), dtype=np.float32)
    np.testing.assert_array_equal(out, resized[2:6].transpose(2, 0, 1))
    assert np.all(out[2] == 7.0)  # a constant channel stays exact


# --- image folders ------------------------------------------------------------------

def write_images(folder, count: int, labels_at=None, size=(4, 4)):
    """Gray images whose every pixel is 10*i; optional labels.tsv (label = 100 + i)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", size, (10 * i,) * 3).save(folder / f"img{i:02d}.png")
    if labels_at is not None:
        lines = ["# file\tclass_index"] + [f"img{i:02d}.png\t{100 + i}" for i in range(count)]
        (labels_at / "labels.tsv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def rgb_model(tmp_path):
    """An NCHW 4x4 RGB model with a raw-pixel spec beside it."""
    (tmp_path / "model.preproc.json").write_text(json.dumps({"scale": 1.0}))
    return identity_model("float[N, 3, 4, 4]"), tmp_path / "model.onnx"


@pytest.mark.parametrize("layout", ["tsv_in_folder", "images_subfolder", "tsv_in_parent"])
def test_image_folder_labels_follow_images(tmp_path, rgb_model, layout):
    model, model_path = rgb_model
    data_dir = tmp_path / "data"
    if layout == "tsv_in_folder":
        write_images(data_dir, 12, labels_at=data_dir)
        given = data_dir
    else:  # the ../shared/models/datasets layout: data/labels.tsv + data/images/*
        write_images(data_dir / "images", 12, labels_at=data_dir)
        given = data_dir if layout == "images_subfolder" else data_dir / "images"
    data = load_dataset(DataConfig(path=given, calib_count=4, seed=3), model, model_path)
    val = [i // 10 for i in ids(data.val)]
    assert data.val_labels.tolist() == [100 + i for i in val]
    assert sorted([i // 10 for i in ids(data.calib)] + val) == list(range(12))
    assert data.calib_count == 4 and data.val_count == 8


def test_image_folder_without_labels_and_subsampled(tmp_path, rgb_model):
    model, model_path = rgb_model
    write_images(tmp_path / "imgs", 20)
    config = DataConfig(path=tmp_path / "imgs", calib_count=3, val_count=5, seed=2)
    data = load_dataset(config, model, model_path)
    assert (data.calib_count, data.val_count, data.val_labels) == (3, 5, None)
    assert not set(ids(data.calib)) & set(ids(data.val))
    again = load_dataset(config, model, model_path)
    assert ids(again.val) == ids(data.val)


@pytest.mark.parametrize("kind", ["images", "npy"])
def test_split_is_prefix_stable_so_check_can_skip_a_run(tmp_path, rgb_model, kind):
    """Same seed, other counts: calibration is the same, validation extends, and
    calibration count = a run's calibration + validation validates on unseen samples."""
    model, model_path = rgb_model
    if kind == "images":
        write_images(tmp_path / "imgs", 24)
        given = tmp_path / "imgs"
    else:
        given = tmp_path / "x.npy"
        np.save(given, numbered(24, (3, 4, 4)) * 10)

    def split(calib, val):
        data = load_dataset(DataConfig(path=given, calib_count=calib, val_count=val, seed=5),
                            model, model_path)
        return ids(data.calib), ids(data.val)

    calib, val = split(4, 6)
    calib_more, val_more = split(4, 12)
    assert calib_more == calib and val_more[:6] == val
    run_read = set(calib) | set(val)
    check_calib, check_val = split(10, 14)
    assert set(check_calib) == run_read and not set(check_val) & run_read
    assert len(check_val) == 14


def test_image_folder_preproc_given_explicitly(tmp_path):
    write_images(tmp_path / "imgs", 4, size=(6, 6))
    spec = tmp_path / "my.json"
    spec.write_text(json.dumps({"crop": 4, "scale": 0.1, "mean": 1.0}))
    data = load_dataset(DataConfig(path=tmp_path / "imgs", preproc=spec, calib_count=2),
                        identity_model("float[N, 3, 4, 4]"), tmp_path / "model.onnx")
    values = sorted(float(s.flat[0]) for b in data.calib + data.val for s in b["x0"])
    np.testing.assert_allclose(values, [i * 10 * 0.1 - 1 for i in range(4)], rtol=1e-6)


IMAGE_ERRORS = {
    "no_spec": "need a preprocessing spec",
    "bad_json": "cannot read preprocessing spec",
    "bad_field": "bad preprocessing spec",
    "missing_label": "no label for img03.png",
    "corrupt_image": "cannot read image",
    "mixed_sizes": "give the spec a 'crop'",
    "wrong_size": "do not fit input",
    "no_images": "no images",
}


@pytest.mark.parametrize("case", sorted(IMAGE_ERRORS))
def test_image_folder_errors_raise_data_error(tmp_path, case):
    message = IMAGE_ERRORS[case]
    folder = tmp_path / "imgs"
    write_images(folder, 4 if case != "no_images" else 0)
    spec = tmp_path / "model.preproc.json"
    spec.write_text({"bad_json": "{not json", "bad_field": '{"resize": "big"}'}.get(
        case, json.dumps({"scale": 1.0})))
    if case == "no_spec":
        spec.unlink()
    if case == "missing_label":
        (folder / "labels.tsv").write_text("img00.png\t1\nimg01.png\t1\nimg02.png\t1\n")
    if case == "corrupt_image":
        (folder / "img02.png").write_bytes(b"\x89PNG not really")
    if case == "mixed_sizes":
        Image.new("RGB", (5, 4)).save(folder / "img02.png")
    model = identity_model("float[N, 3, 2, 2]" if case == "wrong_size" else "float[N, 3, 4, 4]")
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(path=folder), model, tmp_path / "model.onnx")


# --- IDX ----------------------------------------------------------------------------

def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def idx_folder(tmp_path, count=10, label_count=None):
    folder = tmp_path / "idx"
    folder.mkdir()
    write_idx(folder / "t10k-images-idx3-ubyte.gz",
              np.stack([np.full((4, 4), 20 * i) for i in range(count)]))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(label_count or count) % 10)
    return folder


def test_idx_images_and_labels(tmp_path):
    folder = idx_folder(tmp_path)
    data = load_dataset(DataConfig(path=folder, calib_count=4), identity_model("float[1, 1, 4, 4]"))
    assert [b["x0"].shape for b in data.val] == [(1, 1, 4, 4)] * 6
    pixels = [round(float(b["x0"].flat[0]) * 255) for b in data.val]  # default scale 1/255
    assert data.val_labels.tolist() == [(p // 20) % 10 for p in pixels]
    assert len(set(pixels)) == 6


def test_idx_uses_the_spec_beside_the_model(tmp_path):
    folder = idx_folder(tmp_path)
    (tmp_path / "mnist.preproc.json").write_text(json.dumps({"scale": 1.0, "mean": [10.0]}))
    data = load_dataset(DataConfig(path=folder, calib_count=4),
                        identity_model("float[N, 1, 4, 4]"), tmp_path / "mnist.onnx")
    values = sorted(float(v) for b in data.calib + data.val for v in b["x0"][:, 0, 0, 0])
    assert values == [20.0 * i - 10 for i in range(10)]


@pytest.mark.parametrize("damage, message", [
    (lambda f: write_idx(f / "t10k-labels-idx1-ubyte.gz", np.arange(7)), "7 labels for 10"),
    (lambda f: (f / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x03")),
     "bad header"),
    (lambda f: (f / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 4, 4) + b"\x01" * 9)),
     "9 bytes of data"),
    (lambda f: (f / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 8])[:6])[:-6]), "cannot read IDX"),
], ids=["label_count", "bad_magic", "short_data", "truncated_gzip"])
def test_idx_damaged_raises_data_error(tmp_path, damage, message):
    folder = idx_folder(tmp_path)
    damage(folder)
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(path=folder), identity_model("float[N, 1, 4, 4]"))


# --- real data (skips when ../shared/models is absent) ---------------------------------

def test_real_imagenet_sample_efficientnet_top1():
    path = shared_model("efficientnet_lite0")
    images = shared_dataset("imagenet_sample_500")
    import onnx

    model = onnx.load(path)
    data = load_dataset(DataConfig(path=images, calib_count=1, val_count=100, seed=0),
                        model, path)
    assert data.val_count == 100 and data.val[0]["input"].shape[1:] == (3, 224, 224)
    logits = run_model(model, data.val)["logits"]
    accuracy = float(np.mean(logits.argmax(1) == data.val_labels))
    assert accuracy > 0.75  # README: 87.0 % on all 500; +-5 points on 100 images


def test_real_mnist_idx_top1():
    path = shared_model("mnist8_cntk")
    digits = shared_dataset("mnist_test_5000")
    import onnx

    model = onnx.load(path)
    data = load_dataset(DataConfig(path=digits, calib_count=1, val_count=200), model, path)
    assert data.val_count == 200  # batch fixed to 1: 200 batches
    scores = run_model(model, data.val)["Plus214_Output_0"]
    assert float(np.mean(scores.argmax(1) == data.val_labels)) > 0.95  # README: 98.94 %
