"""The toy SDXL: a real, trained `StableDiffusionXLPipeline` for the toy world, shipped with its LoRAs.

Every part is a class diffusers or transformers ships, so `StableDiffusionXLPipeline.from_pretrained`
loads it with no custom code: a UNet with SDXL's block kinds (plain down block, then cross-attention
blocks, a cross-attention mid block) and `text_time` conditioning, the two CLIP text encoders whose
hidden states are concatenated, a small `AutoencoderKL` (32 x 32 pixels <-> 8 x 16 x 16 latents) and
SDXL's own Euler scheduler. `estlora.toy.training` trains all of it from scratch on two CPU cores.

Shipped files (package data, `estlora/toy/assets/`): `model/` (the pipeline), `loras/<name>.safetensors`
(one per subject and style, diffusers format) and `scorer.safetensors`. `toy:<name>` names a shipped
LoRA wherever a LoRA path is accepted, `toy` the base model.
"""

from __future__ import annotations

from pathlib import Path

from ..families.sdxl import SDXL_SCHEDULER_CONFIG
from ..lazy import torch
from .world import MAX_TOKENS, SIZE, STYLES, SUBJECTS, toy_tokenizer

ASSETS = Path(__file__).parent / "assets"
PREFIX = "toy:"
LATENT_CHANNELS = 8
TEXT_WIDTH = 64
POOLED_WIDTH = 32
TIME_EMBED = 8
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SAMPLE_STEPS = 20
GUIDANCE = 4.0
PROMPT = "a sks shape in szn style"
# The pair shown first (the demo's, the UI's preset), chosen by the toy benchmark (benchmarks/RESULTS.md,
# "Fusion quality on the toy world"): where est shows both most often.
DEMO_PAIR = ("heart", "checker")

BENCHMARK = ASSETS / "benchmark.json"  # "shows both" per pair and method, written by benchmarks/quality_toy.py


def benchmark_both() -> dict[str, dict[str, float]]:
    """The toy benchmark's "shows both" share per pair ("heart x diagonal") and method, as shipped."""
    import json

    return json.loads(BENCHMARK.read_text())["both_per_pair"]


def toy_model_path() -> Path:
    return ASSETS / "model"


def toy_lora_path(reference: str) -> Path:
    """`toy:heart` (or plain `heart`) -> the shipped LoRA file."""
    name = reference.removeprefix(PREFIX)
    if name not in SUBJECTS + STYLES:
        from ..errors import LoraNotFoundError

        raise LoraNotFoundError(reference, f"no such toy LoRA (choose from {', '.join(SUBJECTS + STYLES)})")
    return ASSETS / "loras" / f"{name}.safetensors"


def toy_unet():
    """SDXL's UNet at toy size: a plain block at 16 x 16, cross-attention at 8 x 8 (one transformer
    block per attention) and 4 x 4 (two, as SDXL's lowest level has ten), two layers per block where
    SDXL has two: 17 transformer blocks, 136 attention projections at two resolutions (SDXL: 70 and 560)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=(1, 2, 2),  # one resnet at 16 x 16 keeps training within the world's time budget
        block_out_channels=(32, 64, 64),
        attention_head_dim=(2, 4, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        cross_attention_dim=2 * TEXT_WIDTH,  # SDXL concatenates its two text encoders' states
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=POOLED_WIDTH + 6 * TIME_EMBED,
        norm_num_groups=8,
    )


def toy_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=SIZE,
        mid_block_add_attention=False,
        force_upcast=False,
    )


def toy_text_encoders(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=POOLED_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # the pooled output reads the first EOS
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config), CLIPTextModelWithProjection(config)


def build_toy_pipeline(seed: int = 0):
    """An untrained toy pipeline (the starting point of training); the same seed gives the same weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    tokenizer = toy_tokenizer()
    text_encoder, text_encoder_2 = toy_text_encoders(tokenizer)
    return StableDiffusionXLPipeline(
        vae=toy_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=toy_unet(),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )
