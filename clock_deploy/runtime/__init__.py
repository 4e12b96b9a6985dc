"""Deployment runtime: `Detector.load(path)` runs a checkpoint, an ONNX file or a TensorRT engine.

The ONNX and TensorRT paths do not import torch.
"""
from clock_deploy.runtime.detector import Detections, Detector

__all__ = ["Detector", "Detections"]
