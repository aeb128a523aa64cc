"""Named pipelines and the pass options each one sets (``--preset``).

Choosing the default: ``safe`` is the only lossy setting that needs no data and whose
output error is small on every model measured (per-channel int8 weights; activations
stay float, so accuracy moves by tenths of a point at most), while the file shrinks ~4x
and speed is unchanged (the Cast+Mul decode is folded by onnxruntime at load). The
searches (balanced, max) need calibration data to be worth their run time, and static
int8 (``int8``) quantizes activations too.
"""

from __future__ import annotations

# Exact rewrites every preset starts with.
CLEANUP = ("canonicalize", "remove-identity", "fold-constants", "fold-bn", "fold-affine",
           "dedup-initializers")
AUTO = (*CLEANUP, "auto-compress", "remove-dead", "compact-names")
PRESETS: dict[str, tuple[str, ...]] = {
    "lossless": (*CLEANUP, "remove-dead"),
    # Weights stored as per-channel int8, decoded by Cast+Mul that onnxruntime folds at
    # load: ~4x smaller, same speed, output error far inside any budget; needs no data.
    # The per-channel scales and biases left float32 are stored as float16 (folded too;
    # 0-1.5 % of the file: EfficientNet-Lite0 4.80 -> 4.73 MB).
    "safe": (*CLEANUP, "qdq-int8", "half-constants", "remove-dead", "compact-names"),
    # Per-layer mix of int8 and codebooks, searched within half the budget (the other
    # half is margin for inputs the search did not see).
    "balanced": AUTO,
    # The same search with the whole budget and coarser codebooks.
    "max": AUTO,
    # Static int8 for onnxruntime's int8 kernels (speed); names compacted.
    "int8": ("canonicalize", "remove-identity", "fold-constants", "fold-bn", "fold-affine",
             "dedup-initializers", "equalize", "qdq-int8", "remove-dead", "compact-names"),
}
# Options each preset gives its passes; options the user sets win.
PRESET_OPTIONS: dict[str, dict] = {
    "safe": {"weights_only": "int8"},
    "balanced": {"auto_budget_share": 0.5,
                 "auto_candidates": ("f16", "int8", "c6", "c5", "c4")},
    "max": {"auto_budget_share": 1.0,
            "auto_candidates": ("f16", "int8", "c6", "c5", "c4", "c3", "c2")},
}
DEFAULT_PRESET = "safe"
