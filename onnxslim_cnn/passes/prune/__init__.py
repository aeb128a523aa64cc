"""Pruning passes: ``prune-weights`` (unstructured, sparse storage, weights.py) and
``prune-channels`` (structured, a smaller dense graph, channels.py).

Both are lossy and data-aware: the calibration data gives each layer's input Gram
matrix H = X^T X (gram.py), from which the output error of any mask and the
least-squares re-fit of the kept weights follow without training.
"""

from . import channels, weights  # noqa: F401  (registration side effects)
