"""Baselines timed in the same process as attnc: ONNX Runtime WebGPU EP and tinygrad."""
