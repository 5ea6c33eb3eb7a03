"""Loading what the user names: LoRA files into per-linear factors, base models into pipelines, samplers."""
