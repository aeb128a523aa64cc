"""Compact weight storage: weights encoded as standard ONNX ops runtimes fold at load.

(Encoders are added by the storage work; this module already defines the tag every
decode node carries, so that the cleanup passes never fold a decode back into a dense
weight.)
"""

from __future__ import annotations

DECODE_TAG = "onnxslim_decode"
