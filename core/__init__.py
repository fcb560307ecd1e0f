"""medc: compile Google's open medical models to ONNX / TensorRT bundles for the edge, with fidelity gates."""

__version__ = "0.1.0"
