"""Low-level FP8 compute shared by the PyTorch stages and the engine builders (DESIGN 10).

Modules (torch only):
    fp8: the FP8 (e4m3) format: its largest value, static and dynamic per-tensor quantization, per-channel weights.
    fp8_linear: ``StaticFp8Linear``, the static FP8 scheme on ``torch._scaled_mm``.
    attention: FP8 attention kernels (FlashAttention 3, cuDNN FP8 SDPA, an emulated reference) as registered ops,
        and the FLUX attention processor that calls them.
    attention_scales: static Q/K/V scales of FP8 attention.
    gelu: the tanh GELU in its sigmoid form, for compiled engines.
"""
