"""Running a model: the interface every variant answers, exported graphs (ONNX Runtime, OpenVINO) and their export,
the backend table (which runtime computes which precision, on which CPU), CPU flags, and the embedding cache."""
