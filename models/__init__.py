"""Example and benchmark models: ``build`` writes the small committed examples,
``light`` materialises the real architectures shipped inside the onnx package."""
