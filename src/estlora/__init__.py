"""EST-LoRA for diffusers."""
