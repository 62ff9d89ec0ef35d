"""ptqonnx/numerics."""
