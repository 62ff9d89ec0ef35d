"""ptqonnx/calibration."""
