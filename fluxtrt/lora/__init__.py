"""LoRA without a rebuild: reading FLUX LoRA files through diffusers, fusing them into a PyTorch transformer through
peft, and merging them into an engine's transformer weights through its runner (``linear_weights`` /
``set_linear_weights``; an FP8 engine's linears are merged dequantized and quantized again), so that removing them
restores the original weights exactly."""
