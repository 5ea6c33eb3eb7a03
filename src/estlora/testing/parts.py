"""Tiny components the built-in tiny pipelines share: seeded in their builders, so their weights are fixed."""

from __future__ import annotations


def tiny_vae(sample_size: int, **extra):
    """A two-level `AutoencoderKL` (a scale factor of 2) with 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=sample_size,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        **extra,
    )


def tiny_clip_text_config(hidden_size: int, num_hidden_layers: int, **extra):
    """A CLIP text config for the character-level tiny tokenizer (514 tokens, BOS 512, EOS and padding 513)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=num_hidden_layers,
        vocab_size=514,
        hidden_act="gelu",
        **extra,
    )
