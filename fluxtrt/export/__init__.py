"""Export of components to the hand-off formats (ONNX)."""
