"""Static quantization of the transformer's exported graph for engines (DESIGN 5).

Modules (each imports torch/onnx only when used):
    fakequant: PyTorch reference of the static FP8 scheme and of NVFP4, as ``nn.Linear`` wrappers.
    qdq: the exported ONNX -> FP8 (opset 19) or NVFP4 (opset 23) Q/DQ ONNX for TensorRT.

Calibration (the scales) is part of the build: ``fluxtrt.engines.calibrate``.
"""
