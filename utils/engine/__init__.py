"""The engine the modes drive: the training loop, optimiser, ranks, metrics, evaluation, weights loading,
post-training conversion and deployment (ONNX, int8). Import the submodules (they import torch)."""
