"""The toy world: coloured shapes a text-to-image model learns on two CPU cores, a trained toy SDXL and
its subject and style LoRAs (shipped), and a scorer that tells shapes and textures apart.

A fixture for seeing fusion work, offline; nothing below the commands imports it. On import it
registers its names: `toy:<name>` LoRAs, the `toy` base (with the settings it was trained for) and
the `toy` embedder that stands in for DINO when beta is measured on it.
"""

from __future__ import annotations

from ..registry import BasePreset, register_base, register_embedder, register_lora_source
from .model import DEMO_PAIR, GUIDANCE, PREFIX, PROMPT, SAMPLE_STEPS, toy_lora_path, toy_model_path
from .world import STYLES, SUBJECTS


def _embedder(device):
    from .scorer import ToyEmbedder  # DINO knows nothing of 32 x 32 toy shapes; the toy scorer does

    return ToyEmbedder()


register_lora_source(PREFIX, toy_lora_path)
register_embedder("toy", _embedder)
register_base(
    BasePreset(
        name="toy",
        path=toy_model_path,
        label="the toy SDXL",
        description="trained on 32 x 32 coloured shapes: `sks` is the subject LoRA's shape, `szn` the style "
        "LoRA's texture",
        embedder="toy",
        sampling={"steps": SAMPLE_STEPS, "guidance": GUIDANCE},
        prompt=PROMPT,
        loras={  # the demo's pair first
            "subject": tuple(f"{PREFIX}{s}" for s in sorted(SUBJECTS, key=lambda s: s != DEMO_PAIR[0])),
            "style": tuple(f"{PREFIX}{s}" for s in sorted(STYLES, key=lambda s: s != DEMO_PAIR[1])),
        },
    )
)
