"""Recovery of compressed layers by distillation: distill.py (the loss and the loop),
autodiff.py (numpy gradients of the ONNX graph), layers.py (a pass's layers in its
graph)."""
