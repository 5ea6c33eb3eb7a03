"""Routing exactness on the tiny SDXL (fp32, CPU): every comparison is bit for bit (torch.equal).

References are plain diffusers runs: `load_lora_weights` + `set_adapters`, and for per-step changes
the documented recipe (`callback_on_step_end` calling `set_adapters` for the next step).
"""

from __future__ import annotations

import json

import pytest
import torch

import estlora
from estlora.loading.lora import load_lora
from estlora.runtime import fusion as fusion_module

PROMPT = "a photo of sks dog in szn style"


def load_pipe(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return load_pipe(tiny_dir)


@pytest.fixture(scope="module")
def ref_pipe(tiny_dir):
    """A second copy of the same model, for diffusers' own LoRA path."""
    pipe = load_pipe(tiny_dir)
    pipe.load_lora_weights(str(load_lora("example:subject").path), adapter_name="subject")
    pipe.load_lora_weights(str(load_lora("example:style").path), adapter_name="style")
    return pipe


@pytest.fixture(scope="module")
def loras():
    return load_lora("example:subject"), load_lora("example:style")


def run(pipe, steps=4, seed=0, **kwargs):
    kwargs.setdefault("guidance_scale", 5.0)
    out = pipe(
        PROMPT,
        num_inference_steps=steps,
        height=64,
        width=64,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return out.images


def test_subject_plan_equals_diffusers_subject_adapter(pipe, ref_pipe, loras):
    ref_pipe.set_adapters(["subject"], [1.0])
    expected = run(ref_pipe)
    with estlora.fuse(pipe, *loras, method="subject"):
        got = run(pipe)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_equals_diffusers(tiny_dir, loras, dtype):
    """Bit for bit in reduced precision too (CPU fp16 takes another matmul kernel for weights that need grad)."""
    from diffusers import StableDiffusionXLPipeline

    pipes = []
    for _ in range(2):
        pipes.append(StableDiffusionXLPipeline.from_pretrained(tiny_dir, torch_dtype=dtype))
        pipes[-1].set_progress_bar_config(disable=True)
    ours, ref = pipes
    for name, lora in zip(("subject", "style"), loras, strict=True):
        ref.load_lora_weights(str(lora.path), adapter_name=name)
    ref.set_adapters(["subject", "style"], [0.7, 0.45])
    with estlora.fuse(ours, *loras, method="merge", subject_scale=0.7, style_scale=0.45):
        assert torch.equal(run(ours, steps=2), run(ref, steps=2))
    assert all(p.requires_grad for p in ours.unet.parameters())  # remove() unfroze what the fusion froze


@pytest.mark.parametrize(
    "weights, kwargs",
    [((1.0, 1.0), {}), ((0.7, 0.45), {}), ((0.5, 1.25), {"guidance_scale": 1.0, "num_images_per_prompt": 2})],
    ids=["1-1", "0.7-0.45", "no-guidance-batch-2"],
)
def test_merge_plan_equals_set_adapters(pipe, ref_pipe, loras, weights, kwargs):
    ref_pipe.set_adapters(["subject", "style"], list(weights))
    expected = run(ref_pipe, **kwargs)
    with estlora.fuse(pipe, *loras, method="merge", subject_scale=weights[0], style_scale=weights[1]):
        got = run(pipe, **kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("steps, every", [(6, 2), (5, 3)])
def test_switch_plan_equals_per_step_recipe(pipe, ref_pipe, loras, steps, every):
    """diffusers' documented per-step schedule: callback_on_step_end sets the adapters for the next step."""

    def adapter_for(step):
        return "subject" if (step // every) % 2 == 0 else "style"

    def callback(p, step, timestep, callback_kwargs):
        if step + 1 < steps:
            p.set_adapters([adapter_for(step + 1)], [1.0])
        return callback_kwargs

    ref_pipe.set_adapters([adapter_for(0)], [1.0])
    expected = run(ref_pipe, steps=steps, callback_on_step_end=callback)
    with estlora.fuse(pipe, *loras, method="switch", switch_every=every):
        got = run(pipe, steps=steps)
    assert torch.equal(got, expected)


def test_remove_restores_the_pipeline(pipe, loras):
    before = run(pipe)
    originals = {name: m for name, m in pipe.unet.named_modules()}
    fusion = estlora.fuse(pipe, *loras, method="est", beta=0.5)
    fused = run(pipe)
    fusion.remove()
    after = run(pipe)
    assert not torch.equal(fused, before)
    assert torch.equal(after, before)
    assert {name: m for name, m in pipe.unet.named_modules()} == originals  # the very same modules
    assert not pipe.unet._forward_pre_hooks


def test_est_routes_each_projection_per_step(pipe, loras, monkeypatch):
    """Spy on every routed projection: at step i it applies exactly the plan's row i."""
    from estlora.runtime.routing import RoutedLinear

    seen = {}
    original = RoutedLinear.forward

    def spy(self, x, *args, **kwargs):
        seen.setdefault(self.router.step, {})[self.index] = self.router.row[self.index]
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(RoutedLinear, "forward", spy)
    with estlora.fuse(pipe, *loras, method="est", beta=0.3) as fusion:
        run(pipe, steps=7)
        plan = fusion.plan_for(7)
    assert sorted(seen) == list(range(7))
    for step, applied in seen.items():
        assert len(applied) == 560
        expected = []
        for name, (w_c, w_s) in zip(plan.layers, plan.weights[step].tolist(), strict=True):
            c, s = loras[0].projections[name], loras[1].projections[name]
            expected.append((w_c * c.alpha / c.rank if w_c else 0.0, w_s * s.alpha / s.rank if w_s else 0.0))
        assert [applied[i] for i in range(560)] == expected
        assert all((a > 0) != (b > 0) for a, b in expected)  # est: exactly one LoRA per projection
    flips = sum(f is not None for f in plan.flip_steps())
    assert flips > 50, "the example pair should make many projections flip"


@pytest.mark.parametrize(
    "scheduler, kwargs, expected",
    [
        ("EulerDiscreteScheduler", {}, list(range(6))),
        ("DPMSolverMultistepScheduler", {}, list(range(6))),
        ("DDIMScheduler", {}, list(range(6))),
        ("HeunDiscreteScheduler", {}, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]),
        ("EulerDiscreteScheduler", {"strength": 0.5}, [3, 4, 5]),
    ],
    ids=["euler", "dpm-multistep", "ddim", "heun-2nd-order", "img2img-strength-0.5"],
)
def test_step_comes_from_the_pipelines_progress(tiny_dir, loras, monkeypatch, scheduler, kwargs, expected):
    import diffusers

    seen = []
    real = fusion_module.denoising_step

    def spy(sched, timestep):
        result = real(sched, timestep)
        seen.append(result)
        return result

    monkeypatch.setattr(fusion_module, "denoising_step", spy)
    pipe = load_pipe(tiny_dir)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    if "strength" in kwargs:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components)
        pipe.set_progress_bar_config(disable=True)
        kwargs = {**kwargs, "image": torch.rand(1, 3, 64, 64)}
    with estlora.fuse(pipe, *loras, method="est", beta=0.5):
        for _ in range(2):  # repeated calls carry no state
            seen.clear()
            run(pipe, steps=6, **kwargs)
            assert [step for step, _ in seen] == expected
            assert {n for _, n in seen} == {6}


def test_repeated_calls_with_other_step_counts(pipe, ref_pipe, loras):
    ref_pipe.set_adapters(["subject", "style"], [1.0, 1.0])
    with estlora.fuse(pipe, *loras, method="merge"):
        for steps in (3, 5, 3):
            assert torch.equal(run(pipe, steps=steps), run(ref_pipe, steps=steps))


def test_switching_method_does_not_reload(pipe, loras, monkeypatch):
    fusion = estlora.fuse(pipe, *loras, method="est", beta=0.5)
    try:
        calls = []
        monkeypatch.setattr(fusion_module, "load_lora", lambda *a, **k: calls.append(a))
        est = run(pipe)
        fusion.set(method="style")
        style = run(pipe)
        with fusion.using(method="subject"):
            subject = run(pipe)
        again = run(pipe)
        assert calls == []
        assert torch.equal(again, style)
        assert not torch.equal(est, style) and not torch.equal(subject, style)
    finally:
        fusion.remove()


def test_lora_for_another_base_is_refused(pipe, tmp_path):
    from safetensors.torch import save_file

    from estlora.errors import BaseModelMismatchError

    name = "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file(
        {f"{name}.lora_A.weight": torch.ones(2, 2048), f"{name}.lora_B.weight": torch.ones(1280, 2)},
        str(tmp_path / "sdxl.safetensors"),
    )
    with pytest.raises(BaseModelMismatchError, match="another base model"):
        estlora.fuse(pipe, tmp_path / "sdxl.safetensors", "example:style")
    assert not any(type(m).__name__ == "RoutedLinear" for m in pipe.unet.modules())


@pytest.mark.parametrize("merged", [False, True], ids=["unfused", "merged"])
def test_second_fusion_on_the_same_pipeline_is_refused(pipe, loras, merged):
    """Whichever way the first routes (merged routing leaves the linears as they are), and either way
    the second would."""
    with estlora.fuse(pipe, *loras, beta=0.5, merged=merged):
        for second in (False, True):
            with pytest.raises(ValueError, match="already has an estlora fusion"):
                estlora.fuse(pipe, *loras, merged=second)
    estlora.fuse(pipe, *loras, beta=0.5, merged=merged).remove()  # fine again once removed


@pytest.mark.slow
def test_torch_compile_reuses_one_graph_across_steps(tiny_dir, loras, graphs):
    """A compiled UNet gets the step's scales as data: est (many distinct rows), another method
    and another step count reuse the graphs the first run built, and the images equal eager ones.

    The backend runs the captured graphs eagerly, so the comparison is bit for bit: the unused
    LoRA is added times zero, which changes nothing."""
    pipe = load_pipe(tiny_dir)
    fusion = estlora.fuse(pipe, *loras, method="est", beta=0.3)
    assert len({str(row) for row in fusion.plan_for(7).weights.tolist()}) > 3
    eager = {7: run(pipe, steps=7)}
    with fusion.using(method="switch"):
        eager[5] = run(pipe, steps=5)
    pipe.unet.compile(backend=graphs.backend)
    first = run(pipe, steps=7)
    built = len(graphs)
    with fusion.using(method="switch"):
        switched = run(pipe, steps=5)
    assert 0 < built <= 3 and len(graphs) == built, "a new step, method or step count must not recompile"
    assert torch.equal(first, eager[7]) and torch.equal(switched, eager[5])
    fusion.remove()


def test_fuse_into_a_unet_compiled_first(tiny_dir, loras):
    """`torch.compile(pipe.unet)` wraps the UNet (its module names gain `_orig_mod.`): fuse routes
    the UNet inside, and remove() restores it."""
    from estlora.runtime.routing import RoutedLinear

    pipe = load_pipe(tiny_dir)
    inner = pipe.unet
    originals = dict(inner.named_modules())
    pipe.unet = torch.compile(inner)
    fusion = estlora.fuse(pipe, *loras, method="est", beta=0.3)
    assert sum(isinstance(m, RoutedLinear) for m in inner.modules()) == 560
    assert len(inner._forward_pre_hooks) == 1
    fusion.remove()
    assert dict(inner.named_modules()) == originals and not inner._forward_pre_hooks


def test_importing_estlora_does_not_import_the_compiler():
    """torch._dynamo takes about a second to import; every CLI command would pay it at start-up."""
    import subprocess
    import sys

    code = "import sys, estlora; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_between_pipeline_calls_the_unet_is_the_base_alone(pipe, loras):
    """After a run (and before any), a direct call of the routed UNet, positional or by keywords,
    gives the base's output: the plan's rows apply inside a sampling run only."""
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 32, 32, generator=generator)
    text = torch.randn(2, 77, 64, generator=generator)
    added = {"text_embeds": torch.randn(2, 32, generator=generator), "time_ids": torch.randn(2, 6, generator=generator)}

    def direct(**kwargs):
        with torch.no_grad():
            return pipe.unet(sample=sample, timestep=torch.tensor(999), encoder_hidden_states=text, **kwargs).sample

    base = direct(added_cond_kwargs=added)
    with estlora.fuse(pipe, *loras, method="est", beta=0.3) as fusion:
        assert torch.equal(direct(added_cond_kwargs=added), base)
        run(pipe, steps=4)
        assert fusion.router.step is not None  # the run's last step was routed
        assert torch.equal(direct(added_cond_kwargs=added), base)
        with torch.no_grad():
            positional = pipe.unet(sample, 999, text, added_cond_kwargs=added).sample
        assert torch.equal(positional, base)


def test_denoising_step_outside_a_run():
    """The step counter past the schedule's end, or a timestep not in a counter-less schedule: no step."""
    import diffusers

    from estlora.runtime.routing import denoising_step

    euler = diffusers.EulerDiscreteScheduler()
    euler.set_timesteps(4)
    assert denoising_step(euler, lambda: euler.timesteps[0]) == (0, 4)  # before the first step: the first
    euler._step_index = 4
    assert denoising_step(euler, lambda: None) == (None, 4)
    euler._step_index, euler._begin_index = None, 2  # img2img: the begin index
    assert denoising_step(euler, lambda: 0.0) == (2, 4)
    ddim = diffusers.DDIMScheduler()
    ddim.set_timesteps(4)
    assert [denoising_step(ddim, lambda t=t: t)[0] for t in ddim.timesteps] == [0, 1, 2, 3]
    assert denoising_step(ddim, lambda: 998) == (None, 4)


def test_weights_fingerprint_covers_the_routed_weights(tiny_dir):
    """Two loads of one model share it; a LoRA merged into a single attention weight changes it."""
    from estlora.runtime.fusion import weights_fingerprint

    unet = load_pipe(tiny_dir).unet
    assert weights_fingerprint(unet) == weights_fingerprint(load_pipe(tiny_dir).unet)
    weight = unet.get_submodule("up_blocks.0.attentions.1.transformer_blocks.3.attn2.to_v").weight
    with torch.no_grad():
        weight += 1e-3 * torch.randn(weight.shape[0], 2) @ torch.randn(2, weight.shape[1])
    assert weights_fingerprint(unet) != weights_fingerprint(load_pipe(tiny_dir).unet)


def test_route_blocks_routes_every_linear_of_the_transformer_blocks(pipe):
    """Route `blocks`: attention, proj_in/out and the feed-forward linears, 722 on SDXL's layout, each
    applying its plan row at each step; route `attention` leaves the 162 others alone."""
    from conftest import attention_shapes, random_lora
    from estlora.runtime.routing import RoutedLinear

    blocks = attention_shapes(dict(pipe.unet.config), "blocks")
    pair = [random_lora(blocks, rank, 1.0, seed, name) for rank, seed, name in ((2, 3, "c"), (4, 4, "s"))]
    for lora in pair:  # updates small enough that the plan has both LoRAs and images stay finite
        lora.projections = {m: type(f)(f.down * 0.05, f.up * 0.05, f.alpha) for m, f in lora.projections.items()}
    with estlora.fuse(pipe, *pair, method="est", beta=0.3, route="blocks") as fusion:
        routed = {n for n, m in pipe.unet.named_modules() if isinstance(m, RoutedLinear)}
        assert routed == set(blocks) and len(routed) == 722 and fusion.layers == fusion.family.ordered(blocks)
        plan = fusion.plan_for(4)
        assert plan.config.route == "blocks" and len(plan.layers) == 722
        steps = []
        fusion.router.go_to = (lambda real: lambda step, device: (steps.append(step), real(step, device)))(
            fusion.router.go_to
        )
        run(pipe, steps=4)
        assert steps == [0, 1, 2, 3]
    with estlora.fuse(pipe, *pair, method="est", beta=0.3) as fusion:
        assert fusion.config.route == "attention" and len(fusion.layers) == 560
        assert sum(isinstance(m, RoutedLinear) for m in pipe.unet.modules()) == 560


def test_cli_plan_on_route_blocks(capsys):
    from estlora.cli import main

    assert main(["plan", "toy:heart", "toy:outline", "--steps", "4", "--route", "blocks", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["family"], report["route"]) == ("sdxl", "blocks")
    assert len(report["layers"]) == 136  # the toy LoRAs train the attention projections only


def test_factors_of_an_offloaded_linear_follow_the_input_to_its_device():
    """Under sequential offload a linear's weight is on the meta device until its hook loads it: the
    LoRA factors wait on the CPU (not as meta tensors, which would hold nothing) and move, once, to
    the device the call runs on (here the meta device stands in for the GPU, which this machine lacks)."""
    from estlora.runtime.routing import RoutedLinear, Router
    from estlora.updates import LoraFactors

    with torch.device("meta"):
        base = torch.nn.Linear(4, 3)
    factors = LoraFactors(torch.ones(2, 4), torch.ones(3, 2), 2.0)
    router = Router(1)
    router.set_rows([[(1.0, 0.0)]])
    router.go_to(0, torch.device("cpu"))
    routed = RoutedLinear(base, 0, router, factors, None)
    assert routed.subject.down.device.type == "cpu" and torch.equal(routed.subject.down, factors.down)
    out = routed(torch.ones(5, 4, device="meta"))
    assert out.shape == (5, 3) and routed.subject.down.device.type == routed.subject.up.device.type == "meta"
