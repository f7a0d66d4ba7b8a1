"""Static quantization of the transformer for engines: calibration, a fake-quant oracle and Q/DQ ONNX (DESIGN 5).

Modules (each imports torch/onnx only when used):
    calibrate: per-linear input amax over calibration edits, saved as safetensors + a JSON sidecar.
    fakequant: PyTorch reference of the static FP8 scheme and of NVFP4, as ``nn.Linear`` wrappers.
    qdq: the exported ONNX -> FP8 (opset 19) or NVFP4 (opset 23) Q/DQ ONNX for TensorRT.
"""

QUANTIZED_PRECISIONS = ("fp8", "fp4")
