"""Engines and runners: ONNX Runtime, TensorRT, torch; plus the torch-free edge runtime."""
