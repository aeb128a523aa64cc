"""Side-by-side benchmark of onnxslim_cnn against peer compressors (see ``run.py``)."""
