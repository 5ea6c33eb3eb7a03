"""A tiny, seeded FLUX.1 pipeline built entirely in code (no hub, no downloads).

Its transformer has FLUX.1's real block layout (19 double-stream blocks, 38 single-stream blocks,
guidance embedding as in FLUX.1-dev: 494 linears inside the blocks, 304 of them attention
projections) with tiny widths, so every module path a real FLUX.1 LoRA names exists here too. The
CLIP and T5 text encoders and their tokenizers are built in code as well (the T5 tokenizer is a
character-level Unigram). It draws noise; it exists so that loading, planning and routing on FLUX.1
can be tested end to end on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..cache import cache_dir
from ..families.flux import FLUX_DEV_SCHEDULER_CONFIG
from ..outputs import cached_folder, write_folder
from ..tokenizers import tiny_clip_tokenizer
from .parts import tiny_clip_text_config, tiny_vae

TINY_SEED = 0
# Bump when the weights or the layout change, so cached copies are rebuilt.
TINY_FLUX_VERSION = 1
WIDTH = 16  # inner width of the transformer: 2 heads of 8
TEXT_WIDTH = 32  # T5's width (joint attention) and CLIP's pooled width


def tiny_t5_tokenizer():
    """A T5 tokenizer (Unigram, as T5's) over printable ASCII, each character with and without the
    word-start marker, built offline."""
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in chars]
    return T5TokenizerFast(vocab=vocab, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def tiny_flux_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels, packed 2 x 2
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=True,  # FLUX.1-dev's embedded guidance (schnell has none)
        axes_dims_rope=(2, 2, 4),
    )


def build_tiny_flux(seed: int = TINY_SEED):
    """Build the tiny pipeline in memory; the same seed gives the same weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = tiny_flux_transformer()
    torch.manual_seed(seed)
    vae = tiny_vae(64, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    clip_tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_text_config(TEXT_WIDTH, 2))
    t5_tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=TEXT_WIDTH,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            dropout_rate=0.0,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG)
    for model in (transformer, vae, text_encoder, text_encoder_2):
        model.eval()  # as from_pretrained leaves them
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def write_tiny_flux(directory: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write the tiny pipeline as a diffusers folder (safetensors), atomically."""
    return write_folder(directory, lambda staging: build_tiny_flux(seed).save_pretrained(staging))


def builtin_tiny_flux() -> Path:
    """The built-in tiny FLUX.1's folder, written to the cache on first use."""
    return cached_folder(cache_dir() / f"tiny-flux-v{TINY_FLUX_VERSION}", "model_index.json", write_tiny_flux)
