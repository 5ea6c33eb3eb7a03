"""The EST-LoRA Fuse node's cost per sampler step against ComfyUI's own LoraLoader with one LoRA, on the CPU.

A mid-size SDXL-shaped UNet built by ComfyUI (widths 128/256/512, 10 transformer blocks, 512 px), two
rank-16 kohya LoRAs on its attention projections; KSampler's euler, CFG batch. Interleaved runs,
medians. `--json` writes the numbers. Needs ComfyUI (tests/comfy_world.py says where it comes from).

    .venv/bin/python benchmarks/comfyui_cost.py --repeats 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import comfy_world  # noqa: E402

CONFIG = comfy_world.TINY_SDXL | {
    "model_channels": 128, "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 4], "transformer_depth": [0, 2, 2],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2], "transformer_depth_middle": 2, "context_dim": 256,
    "num_head_channels": 64,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="latent side (64: 512 px)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    nodes = comfy_world.import_comfyui(comfy_world.comfyui_root())
    import comfy.sample
    import folder_paths

    loras = Path(tempfile.mkdtemp())
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    model = comfy_world.tiny_sdxl(unet_config=CONFIG)
    modules = comfy_world.attention_modules(model)
    comfy_world.kohya_lora(loras / "subject.safetensors", modules, 16, 16.0, 1, {"down": 1.6, "up": 0.7})
    comfy_world.kohya_lora(loras / "style.safetensors", modules, 16, 16.0, 2, {"down": 0.7, "up": 1.6})
    sys.path.insert(0, str(comfy_world.REPO))
    from comfyui.fusion import fuse

    from estlora.config import FusionConfig

    with torch.inference_mode():
        (loaded,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "subject.safetensors", 1.0)
        variants = {"base": model, "LoraLoader": loaded}
        for method in ("subject", "est"):
            config = FusionConfig(method=method, beta=0.5)
            variants[f"fuse {method}"] = fuse(model, None, loras / "subject.safetensors", loras / "style.safetensors",
                                              config)[0]
    generator = torch.Generator().manual_seed(3)
    cond, pooled = torch.randn(1, 77, 256, generator=generator), torch.randn(1, 32, generator=generator)
    positive = [[cond, {"pooled_output": pooled}]]
    negative = [[torch.zeros_like(cond), {"pooled_output": torch.zeros_like(pooled)}]]
    latent = torch.zeros(1, 4, args.size, args.size)
    noise = torch.randn(latent.shape, generator=generator)

    def run(patched) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            comfy.sample.sample(patched, noise, args.steps, 5.0, "euler", "normal", positive, negative, latent,
                                seed=0, disable_pbar=True)
        return (time.perf_counter() - start) / args.steps

    for patched in variants.values():
        run(patched)  # warm: ComfyUI loads (and LoraLoader merges) on the first run
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, patched in variants.items():
            times[name].append(run(patched))
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = medians["LoraLoader"]
    for name, value in medians.items():
        print(f"{name:12} {value * 1000:8.1f} ms/step  {value / reference:6.3f} x LoraLoader")
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds_per_step": medians, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
