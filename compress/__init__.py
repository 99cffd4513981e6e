"""Compression of zoo models: export to ONNX Runtime / OpenVINO, calibrated INT8 quantization."""

import zoo  # noqa: F401  first, for its Ctrl-C start-up guard (zoo.interrupts)
