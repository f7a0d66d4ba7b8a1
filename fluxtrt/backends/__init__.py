"""Runners: one ``infer(feed) -> outputs`` contract over every backend (torch, ONNX Runtime, TensorRT, AOTInductor)."""
