"""validate: metrics on hand-computed examples, tolerance and budget checks, runner errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxslim_cnn.config import Budget, Tolerance
from onnxslim_cnn.errors import UnsupportedModelError, ValidationError
from onnxslim_cnn.validate import (
    SQNR_CAP,
    Metrics,
    OutputMetrics,
    Runner,
    check_budget,
    check_lossless,
    classifier_scores,
    compare,
)

from .helpers import make_model

F = np.float32

# r: 2 samples x 2 classes; y moves sample 0's second score from 0 to 1.5 and sample
# 1's from 2 to 1 (diff [[0, 1.5], [0, 1]]).
R = np.array([[1.0, 0.0], [0.0, 2.0]], F)
Y = np.array([[1.0, 1.5], [0.0, 1.0]], F)


def test_metrics_hand_computed():
    m = compare({"out": R}, {"out": Y}).outputs[0]
    assert m.max_abs == 1.5
    assert m.max_rel == 1.5 / 2.0  # max_abs / max|r|
    cos0, cos1 = 1.0 / math.sqrt(1 + 1.5**2), (2.0 * 1.0) / (2.0 * 1.0)
    assert m.cosine == pytest.approx((cos0 + cos1) / 2, rel=1e-12)
    assert m.cosine_min == pytest.approx(cos0, rel=1e-12)
    # 20 log10(||r|| / ||y - r||) = 20 log10(sqrt(5) / sqrt(1.5^2 + 1))
    assert m.sqnr_db == pytest.approx(20 * math.log10(math.sqrt(5) / math.sqrt(3.25)), rel=1e-12)
    assert m.top1_agreement == 0.5  # argmax r = [0, 1], argmax y = [1, 1]


def test_metrics_identical_outputs():
    m = compare({"out": R}, {"out": R.copy()}).outputs[0]
    assert (m.max_abs, m.max_rel, m.cosine, m.cosine_min, m.sqnr_db, m.top1_agreement) == \
        (0.0, 0.0, 1.0, 1.0, SQNR_CAP, 1.0)


def test_metrics_zero_reference_nonzero_candidate():
    m = compare({"out": np.zeros((2, 3), F)}, {"out": np.ones((2, 3), F)}).outputs[0]
    assert (m.cosine, m.sqnr_db, m.max_rel) == (0.0, -SQNR_CAP, 1.0)


@pytest.mark.parametrize("shape, classifier", [
    ((4, 3), True), ((4, 3, 1, 1), True), ((4, 3, 2, 2), False), ((4,), False),
    ((4, 1), False), ((4, 3, 1, 2), False),
])
def test_top1_agreement_only_for_classifier_shapes(shape, classifier):
    r = np.random.default_rng(0).standard_normal(shape).astype(F)
    m = compare({"o": r}, {"o": r * 2}).outputs[0]
    assert (m.top1_agreement is not None) == classifier
    assert (classifier_scores(r) is not None) == classifier
    if classifier:
        assert m.top1_agreement == 1.0  # scaling by 2 keeps every argmax


def test_accuracies_with_labels():
    r = np.eye(3, dtype=F)[[0, 1, 2, 0]]  # argmax 0 1 2 0
    y = np.eye(3, dtype=F)[[0, 1, 1, 1]]  # argmax 0 1 1 1
    metrics = compare({"o": r}, {"o": y}, labels=np.array([0, 1, 2, 2]))
    assert (metrics.top1_ref, metrics.top1) == (0.75, 0.5)
    assert metrics.top1_drop == pytest.approx(25.0)
    assert metrics.top1_agreement == 0.5
    assert metrics.to_dict()["top1_drop"] == pytest.approx(25.0)


def test_accuracies_skip_outputs_too_narrow_for_the_labels():
    # 3 classes cannot be scored against label 7: no accuracy rather than a wrong one
    r = np.eye(3, dtype=F)
    metrics = compare({"o": r}, {"o": r}, labels=np.array([0, 1, 7]))
    assert metrics.top1_ref is None and metrics.top1_drop is None


def test_compare_shape_change_raises():
    with pytest.raises(ValidationError, match=r"changed shape \[2, 2\] -> \[2, 2, 1, 1\]"):
        compare({"out": R}, {"out": R.reshape(2, 2, 1, 1)})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_candidate_fails_every_check(bad):
    y = R.copy()
    y[1, 0] = bad
    metrics = compare({"o": R}, {"o": y})
    m = metrics.outputs[0]
    assert m.max_abs == math.inf and m.cosine == -1.0 and m.sqnr_db == -SQNR_CAP
    assert check_budget(metrics, Budget(min_cosine=-1.0)) == "outputs contain NaN or Inf"
    assert "NaN or Inf" in check_lossless({"o": R}, {"o": y}, Tolerance(rtol=1, atol=1))


def test_nonfinite_reference_matched_by_candidate_passes():
    # A model that itself outputs NaN/Inf (log of a negative input) still validates when
    # the candidate has the same non-finite values in the same places.
    r = np.array([[np.nan, 1.0], [np.inf, 2.0]], F)
    y = np.array([[np.nan, 1.0], [np.inf, 2.0 + 1e-7]], F)
    assert check_lossless({"o": r}, {"o": y}, Tolerance(rtol=1e-6, atol=0)) is None
    m = compare({"o": r}, {"o": y}).outputs[0]
    assert math.isfinite(m.max_abs) and m.max_abs < 1e-6 and m.sqnr_db > 100
    y[1, 0] = -np.inf
    assert "NaN or Inf" in check_lossless({"o": r}, {"o": y}, Tolerance())


@pytest.mark.parametrize("ref, cand, tol, ok", [
    # atol is scaled by max(1, max|ref|): 1e-5 * 1000 = 0.01 around every element
    ([1000.0, 0.0], [1000.0, 0.009], Tolerance(rtol=0, atol=1e-5), True),
    ([1000.0, 0.0], [1000.0, 0.011], Tolerance(rtol=0, atol=1e-5), False),
    # ... but never by less than 1
    ([0.5, 0.0], [0.5, 0.9e-5], Tolerance(rtol=0, atol=1e-5), True),
    ([0.5, 0.0], [0.5, 1.1e-5], Tolerance(rtol=0, atol=1e-5), False),
    # rtol * |ref| per element: bound 1e-5 * 100 + 0.004 * 100 = 0.401
    ([100.0], [100.5], Tolerance(rtol=0.004, atol=1e-5), False),
    ([100.0], [100.5], Tolerance(rtol=0.006, atol=1e-5), True),
])
def test_check_lossless_scaling(ref, cand, tol, ok):
    reason = check_lossless({"o": np.array(ref)}, {"o": np.array(cand)}, tol)
    assert (reason is None) == ok, reason


def test_check_lossless_default_tolerance_by_dtype():
    r = np.array([1.0, 2.0], np.float16)
    y = np.array([1.0, 2.0078125], np.float16)  # one fp16 ulp at 2
    assert check_lossless({"o": r}, {"o": y}) is None  # fp16 default: rtol 1e-2
    assert check_lossless({"o": r.astype(F)}, {"o": y.astype(F)}) is not None  # fp32: 1e-4


def test_check_lossless_shape_change_fails():
    reason = check_lossless({"o": R}, {"o": R.reshape(4)}, Tolerance())
    assert reason is not None and "changed shape" in reason


def metrics_of(cosine=1.0, agreement=None, top1_ref=None, top1=None, max_abs=0.0) -> Metrics:
    out = OutputMetrics("o", max_abs, max_abs, cosine, cosine, 50.0, agreement)
    return Metrics([out], samples=10, top1_ref=top1_ref, top1=top1)


@pytest.mark.parametrize("metrics, budget, reason", [
    (metrics_of(), Budget(), None),
    (metrics_of(cosine=0.98), Budget(min_cosine=0.99), "cosine 0.98000 < 0.99"),
    (metrics_of(cosine=0.99), Budget(min_cosine=0.99), None),
    (metrics_of(top1_ref=0.80, top1=0.78), Budget(max_top1_drop=1.0),
     "top-1 drop 2.00 points > 1.0"),
    (metrics_of(top1_ref=0.80, top1=0.795), Budget(max_top1_drop=1.0), None),
    (metrics_of(agreement=0.9), Budget(min_top1_agreement=0.95), "top-1 agreement 0.9000 < 0.95"),
    (metrics_of(agreement=0.9), Budget(), None),  # agreement not budgeted by default
    (metrics_of(max_abs=math.inf), Budget(min_cosine=-1), "outputs contain NaN or Inf"),
], ids=["all_ok", "cosine_low", "cosine_equal", "top1_drop", "top1_small_drop",
        "agreement_low", "agreement_unbudgeted", "nonfinite"])
def test_check_budget_each_criterion(metrics, budget, reason):
    assert check_budget(metrics, budget) == reason


# --- Runner -------------------------------------------------------------------------

RESHAPE = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3] x) => (float[5] y) { y = Reshape (x, s) }
"""


def test_runner_run_failure_raises_unsupported():
    model = make_model(RESHAPE, {"s": np.array([5], dtype=np.int64)})
    runner = Runner(model)
    try:
        with pytest.raises(UnsupportedModelError, match="cannot run the model") as info:
            runner.run_batch({"x": np.zeros((2, 3), F)})
        assert "onnxruntime_src" not in str(info.value)
        with pytest.raises(UnsupportedModelError, match=r"no data for model input\(s\) \['x'\]"):
            runner.run_batch({"z": np.zeros((2, 3), F)})
    finally:
        runner.close()


def test_runner_load_failure_raises_unsupported():
    model = make_model(RESHAPE, {"s": np.array([5], dtype=np.int64)})
    model.opset_import[0].version = 99
    with pytest.raises(UnsupportedModelError, match="cannot load the model"):
        Runner(model)


def test_runner_concatenates_batches():
    model = make_model("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 2] x) => (float[N, 2] y) { y = Neg (x) }
    """)
    runner = Runner(model)
    try:
        a, b = np.ones((3, 2), F), np.full((2, 2), 2.0, F)
        np.testing.assert_array_equal(runner.run([{"x": a}, {"x": b}])["y"], -np.vstack([a, b]))
        with pytest.raises(UnsupportedModelError, match="no samples"):
            runner.run([])
    finally:
        runner.close()


def _metrics(cosine: float, top1_ref: float | None, top1: float | None) -> Metrics:
    out = OutputMetrics(name="y", max_abs=0.5, max_rel=0.1, cosine=cosine, cosine_min=cosine,
                        sqnr_db=10.0, top1_agreement=0.9)
    return Metrics(outputs=[out], samples=400, top1_ref=top1_ref, top1=top1)


@pytest.mark.parametrize(("replaces", "labelled", "expect"), [
    (False, True, "cosine 0.95000 < 0.99"),   # both criteria apply
    (True, True, None),                        # the stated top-1 budget binds alone
    (True, False, "cosine 0.95000 < 0.99"),   # no labels: the cosine floor stays
])
def test_check_budget_top1_replaces_cosine_only_with_labels(replaces, labelled, expect):
    budget = Budget(max_top1_drop=1.0, min_cosine=0.99, top1_replaces_cosine=replaces)
    metrics = _metrics(0.95, 0.80 if labelled else None, 0.795 if labelled else None)
    assert check_budget(metrics, budget) == expect


def test_check_budget_top1_replacing_cosine_still_gates_on_top1():
    budget = Budget(max_top1_drop=1.0, top1_replaces_cosine=True)
    assert check_budget(_metrics(0.999, 0.80, 0.78), budget) == "top-1 drop 2.00 points > 1.0"


def test_check_budget_drop_of_exactly_the_budget_passes():
    # 1 sample of 100 lost: 100 * (0.81 - 0.80) = 1.0000000000000009 in floating point
    metrics = _metrics(0.999, 0.81, 0.80)
    assert metrics.top1_drop > 1.0
    assert check_budget(metrics, Budget(max_top1_drop=1.0)) is None
    assert check_budget(_metrics(0.999, 0.81, 0.79), Budget(max_top1_drop=1.0)) is not None


def _classifier_outputs(flip_barely=0, flip_confident=0, soften=0.0):
    """100 samples, 10 classes, as probabilities: 70 correct at p(y) 0.6, of which the
    first 10 only barely (0.34 against 0.33). The candidate flips ``flip_barely`` of the
    barely correct ones (0.33 against 0.34), ``flip_confident`` confident ones (p(y) 0.2)
    and takes ``soften`` off the p(y) of the other 90 (spread over the other classes)."""
    labels = np.arange(100) % 10
    def probs(p_true, p_rival):
        p = np.full((100, 10), 0.0)
        rival = (labels + 1) % 10
        p[np.arange(100), labels] = p_true
        p[np.arange(100), rival] = p_rival
        rest = (1 - p_true - p_rival) / 8
        mask = p == 0
        p[mask] = np.repeat(rest, 8)
        return p
    p_true = np.where(np.arange(100) < 70, 0.6, 0.2)
    p_rival = np.where(np.arange(100) < 70, 0.1, 0.5)
    p_true[:10], p_rival[:10] = 0.34, 0.33
    ref = probs(p_true, p_rival)
    c_true, c_rival = p_true.copy(), p_rival.copy()
    c_true[:flip_barely], c_rival[:flip_barely] = 0.33, 0.34
    c_true[10:10 + flip_confident], c_rival[10:10 + flip_confident] = 0.2, 0.5
    cand = probs(np.where(np.arange(100) >= 10, c_true - soften, c_true), c_rival)
    return {"y": ref}, {"y": cand}, labels


@pytest.mark.parametrize("case, fails", [
    ({"flip_barely": 3}, False),  # 3 points on 100 samples, F=3: noise, p(y) barely moves
    ({"flip_confident": 20}, True),  # 20 points: significant
    ({"flip_barely": 3, "soften": 0.05}, True),  # the expected accuracy drops 4.5 points
    ({"flip_barely": 1}, False),  # within the budget as counted
])
def test_check_budget_top1_drop_fails_only_when_significant_or_expected(case, fails):
    ref, cand, labels = _classifier_outputs(**case)
    metrics = compare(ref, cand, labels)
    reason = check_budget(metrics, Budget(max_top1_drop=1.0, min_cosine=0.0))
    assert (reason is not None) == fails, reason
    flips = case.get("flip_barely", 0) + case.get("flip_confident", 0)
    assert metrics.top1_flips == flips
    assert metrics.top1_error == pytest.approx(100 * np.sqrt(flips) / 100)
    expected = 100 * np.mean(ref["y"][np.arange(100), labels] - cand["y"][np.arange(100), labels])
    assert metrics.expected_drop == pytest.approx(expected)
    # scores that are not probabilities are read through their softmax
    logits = compare({"y": np.log(ref["y"]) + 3.0}, {"y": np.log(cand["y"]) + 3.0}, labels)
    assert logits.expected_drop == pytest.approx(expected)
    assert (logits.top1_flips, logits.top1_drop) == (flips, metrics.top1_drop)
