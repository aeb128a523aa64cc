"""Rewrite passes. Importing this package registers every pass in ``REGISTRY``."""

from . import (  # noqa: F401  (registration side effects)
    canonicalize,
    cluster,
    compact_names,
    dedup_initializers,
    equalize,
    fold_affine,
    fold_bn,
    fold_constants,
    half_constants,
    prune,
    qdq,
    remove_dead,
    remove_identity,
    svd,
)
from .base import REGISTRY, NoOptions, Pass, PassContext, PassResult, get_pass, register

__all__ = ["REGISTRY", "NoOptions", "Pass", "PassContext", "PassResult", "get_pass", "register"]
