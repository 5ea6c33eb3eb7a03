"""LoRA Composite (Zhong et al. 2024, arXiv 2402.16843): each LoRA in a denoiser pass of its own, the
passes' predictions averaged. Checked bit for bit against a reference made of plain diffusers calls
(peft adapters switched per pass, the pipeline's own guidance and scheduler), on SDXL and FLUX.1."""

from __future__ import annotations

import pytest
import torch

from estlora import fuse
from estlora.loading.base import load_pipeline
from estlora.testing.examples import example_lora_path
from estlora.testing.tiny_flux import builtin_tiny_flux

STEPS = 3
PAIRS = {
    "sdxl": ("example:subject", "example:style", {}),
    "flux1": ("example:flux-subject", "example:flux-style", {"width": 32, "height": 32}),
}


def render(pipe, seed: int = 0, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe("a sks dog in szn style", num_inference_steps=STEPS, generator=generator, output_type="latent",
                **kwargs).images  # fmt: skip


class PerAdapterAverage(torch.nn.Module):
    """The reference denoiser: the wrapped model once with each peft adapter alone, outputs averaged
    (a + b) / 2. Everything else (guidance, scheduler, VAE) is the diffusers pipeline's own."""

    def __init__(self, model, adapters: list[str], calls: list):
        super().__init__()
        self.model, self.adapters, self.calls = model, adapters, calls

    @property
    def config(self):
        return self.model.config

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        outputs = []
        for adapter in self.adapters:
            self.model.set_adapters([adapter])
            outputs.append(self.model(*args, **kwargs)[0])
            self.calls.append(adapter)
        return ((outputs[0] + outputs[1]) / 2,)


def denoiser_name(pipe) -> str:
    return "unet" if hasattr(pipe, "unet") else "transformer"


@pytest.mark.parametrize("family", list(PAIRS))
def test_composite_is_the_average_of_each_lora_alone_bit_for_bit(tiny_dir, family):
    subject, style, size = PAIRS[family]
    folder = tiny_dir if family == "sdxl" else builtin_tiny_flux()
    reference = load_pipeline(str(folder))
    reference.set_progress_bar_config(disable=True)
    for name, path in (("subject", subject), ("style", style)):
        reference.load_lora_weights(str(example_lora_path(path)), adapter_name=name)
    name = denoiser_name(reference)
    calls: list[str] = []
    setattr(reference, name, PerAdapterAverage(getattr(reference, name), ["subject", "style"], calls))
    expected = render(reference, **size)
    assert len(calls) == 2 * STEPS

    pipe = load_pipeline(str(folder))
    pipe.set_progress_bar_config(disable=True)
    model = getattr(pipe, name)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    with fuse(pipe, subject, style, method="composite") as fusion:
        ours = render(pipe, **size)
        assert fusion.plan_for(STEPS).to_dict()["separate_passes"]
    assert torch.equal(ours, expected)
    assert len(forwards) == STEPS  # the hook's second pass is the same call, not a second call


def test_one_step_composite_is_the_mean_of_the_guided_predictions(tiny_dir):
    """At a single Euler step x1 = x0 + (sigma1 - sigma0) eps is linear in eps, so the composite's
    result is the mean of each LoRA's one-step result (the paper's average of guided predictions)."""
    pipe = load_pipeline(str(tiny_dir))
    pipe.set_progress_bar_config(disable=True)

    def one_step(fusion, method):
        fusion.set(method=method)
        generator = torch.Generator().manual_seed(3)
        return pipe("a sks dog", num_inference_steps=1, guidance_scale=5.0, generator=generator,
                    output_type="latent").images  # fmt: skip

    with fuse(pipe, "example:subject", "example:style", method="composite") as fusion:
        ours = one_step(fusion, "composite")
        alone = [one_step(fusion, method) for method in ("subject", "style")]
    torch.testing.assert_close(ours, (alone[0] + alone[1]) / 2, rtol=0, atol=1e-5)
    assert (alone[0] - alone[1]).abs().max() > 1e-3  # the two LoRAs do differ


def test_composite_with_merged_weights_equals_the_unfused_composite(tiny_dir):
    pipe = load_pipeline(str(tiny_dir))
    pipe.set_progress_bar_config(disable=True)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with fuse(pipe, "example:subject", "example:style", method="composite"):
        exact = render(pipe)
    with fuse(pipe, "example:subject", "example:style", method="composite", merged=True):
        merged = render(pipe)
    torch.testing.assert_close(merged, exact, rtol=0, atol=1e-5)
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_cli_renders_composite_as_the_api_does(tiny_dir, tmp_path):
    """`estlora generate --method composite`: the API's image, and the sidecar's command makes it again."""
    import json
    import shlex

    import numpy as np
    from PIL import Image

    from estlora.cli import main

    args = ["generate", "--base", str(tiny_dir), "--subject", "example:subject", "--style", "example:style",
            "--prompt", "a sks dog in szn style", "--steps", str(STEPS), "--method", "composite", "--seed", "5"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "cli")]) == 0
    (png,) = (tmp_path / "cli").glob("*.png")
    meta = json.loads(png.with_suffix(".json").read_text())
    assert meta["settings"]["method"] == "composite" and meta["beta_source"] == "unused"
    pipe = load_pipeline(str(tiny_dir))
    pipe.set_progress_bar_config(disable=True)
    with fuse(pipe, "example:subject", "example:style", method="composite"):
        api = pipe("a sks dog in szn style", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(5),
                   guidance_scale=meta["settings"]["guidance"], height=meta["settings"]["height"],
                   width=meta["settings"]["width"]).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(api))
    assert main([*shlex.split(meta["command"])[1:], "--out", str(tmp_path / "again")]) == 0
    (again,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(again)))
