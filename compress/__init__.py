"""Compression of zoo models: export to ONNX Runtime / OpenVINO, calibrated INT8 quantization."""
