"""Test helper: a diffusers SDXL pipeline written as one Stability (SGM) single-file checkpoint.

This is the layout of `sd_xl_base_1.0.safetensors` and of fine-tuned SDXL checkpoints shared as one
file. Tests use it to make such files from tiny models offline; loading them back through diffusers'
`from_single_file` and comparing every tensor checks this converter and estlora's loading at once.
"""

from __future__ import annotations

import re

import torch

RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
OPENCLIP_PARTS = {
    "text_model.encoder.layers.": "transformer.resblocks.",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    ".fc1.": ".c_fc.",
    ".fc2.": ".c_proj.",
    ".self_attn.": ".attn.",
    "text_model.final_layer_norm.": "ln_final.",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
}
VAE_ATTENTION_PARTS = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def _rename(key: str, prefixes: dict[str, str]) -> tuple[str, str]:
    """(new prefix + rest, the diffusers prefix that matched) for the longest matching prefix."""
    match = max((p for p in prefixes if key.startswith(p)), key=len, default="")
    return prefixes.get(match, "") + key[len(match) :], match


def unet_to_sgm(unet) -> dict[str, torch.Tensor]:
    config = unet.config
    layers = config.layers_per_block
    prefixes = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    for i in range(len(unet.down_blocks)):
        for j in range(layers):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(layers + 1) * i + j + 1}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(layers + 1) * i + j + 1}.1."
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(layers + 1) * (i + 1)}.0.op."
    for i, block in enumerate(unet.up_blocks):
        for j in range(layers + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(layers + 1) * i + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(layers + 1) * i + j}.1."
        upsample = 2 if getattr(block, "attentions", None) else 1
        prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(layers + 1) * i + layers}.{upsample}."
    out = {}
    for key, value in unet.state_dict().items():
        name, matched = _rename(key, prefixes)
        if ".resnets." in matched:
            part, _, leaf = key[len(matched) :].partition(".")
            name = prefixes[matched] + RESNET_PARTS.get(part, part) + "." + leaf
        out["model.diffusion_model." + name] = value
    return out


def vae_to_sgm(vae) -> dict[str, torch.Tensor]:
    blocks = len(vae.config.block_out_channels)
    prefixes = {}
    for coder in ("encoder", "decoder"):
        prefixes[f"{coder}.conv_norm_out."] = f"{coder}.norm_out."
        prefixes[f"{coder}.mid_block.attentions.0."] = f"{coder}.mid.attn_1."
        for j in range(2):
            prefixes[f"{coder}.mid_block.resnets.{j}."] = f"{coder}.mid.block_{j + 1}."
    for i in range(blocks):
        up = blocks - 1 - i  # SGM numbers decoder levels from the lowest resolution
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{up}.upsample."
        for j in range(vae.config.layers_per_block + 1):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{up}.block.{j}."
    out = {}
    for key, value in vae.state_dict().items():
        name, matched = _rename(key, prefixes)
        name = name.replace("conv_shortcut", "nin_shortcut")
        if matched.endswith("attentions.0."):
            part, _ = _rename(key[len(matched) :], VAE_ATTENTION_PARTS)
            name = prefixes[matched] + part
            if value.ndim == 2:  # SGM's VAE attention uses 1 x 1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + name] = value
    return out


def clip_to_sgm(text_encoder) -> dict[str, torch.Tensor]:
    """CLIP ViT-L keeps transformers' names under `conditioner.embedders.0.transformer.text_model.`."""
    prefix = "conditioner.embedders.0.transformer."
    return {
        prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v
        for k, v in text_encoder.state_dict().items()
    }


def open_clip_to_sgm(text_encoder) -> dict[str, torch.Tensor]:
    """OpenCLIP ViT-bigG: fused q/k/v (`in_proj`), its own names, and a transposed text projection."""
    prefix = "conditioner.embedders.1.model."
    state = text_encoder.state_dict()
    out = {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        match = re.match(r"(.+\.self_attn\.)([qkv])_proj\.(weight|bias)$", key)
        if match:
            if match.group(2) == "q":
                head, kind = match.group(1), match.group(3)
                fused = torch.cat([state[f"{head}{p}_proj.{kind}"] for p in "qkv"])
                out[prefix + _openclip_name(head) + f"in_proj_{kind}"] = fused
            continue
        out[prefix + _openclip_name(key)] = value
    return out


def _openclip_name(key: str) -> str:
    for old, new in OPENCLIP_PARTS.items():
        key = key.replace(old, new)
    return key


def pipeline_to_sgm(pipe) -> dict[str, torch.Tensor]:
    """The whole SDXL pipeline (UNet, VAE, both text encoders) as one SGM state dict."""
    return {
        **unet_to_sgm(pipe.unet),
        **vae_to_sgm(pipe.vae),
        **clip_to_sgm(pipe.text_encoder),
        **open_clip_to_sgm(pipe.text_encoder_2),
    }


def tiny_sdxl_with_distinct_encoders():
    """The tiny SDXL with a 48-wide second text encoder (UNet cross-attention 32 + 48 = 80).

    diffusers' single-file loader tells SDXL's two text encoders apart by their widths (768 and
    1280 in SDXL); the tiny model's are both 32, so this variant is the one that round-trips.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from estlora.testing.tiny_sdxl import build_tiny_sdxl

    pipe = build_tiny_sdxl()
    torch.manual_seed(1)
    text_config = {**pipe.text_encoder_2.config.to_dict(), "hidden_size": 48}
    pipe.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    torch.manual_seed(2)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 80})
    return pipe


def write_single_file(pipe, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in pipeline_to_sgm(pipe).items()}, str(path))
