"""Merged routing (`fuse(..., merged=True)`, `--merge-weights`): the plan's choice written into the
routed weights where it changes. Checked against diffusers' own `fuse_lora`, against the exact unfused
path, by a spy on the rows written, and for the base weights coming back bit for bit."""

from __future__ import annotations

import pytest
import torch

from estlora import fuse
from estlora.loading.base import load_pipeline
from estlora.testing.examples import example_lora_path
from estlora.testing.tiny_flux import builtin_tiny_flux

STEPS = 4


def render(pipe, seed: int = 0, **kwargs) -> torch.Tensor:
    kwargs.setdefault("num_inference_steps", STEPS)
    generator = torch.Generator().manual_seed(seed)
    return pipe("a sks dog", generator=generator, output_type="pt", **kwargs).images


def fresh(folder, dtype: str = "fp32"):
    pipe = load_pipeline(str(folder), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weights(pipe) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in pipe.unet.state_dict().items()}


@pytest.mark.parametrize(
    ("base", "subject", "style", "size"),
    [
        ("sdxl", "example:subject", "example:style", {}),
        ("flux", "example:flux-subject", "example:flux-style", {"width": 32, "height": 32}),
    ],
    ids=["sdxl", "flux1"],
)
def test_a_subject_only_plan_equals_diffusers_fuse_lora(tiny_dir, base, subject, style, size):
    """fp32: bit for bit what diffusers gives with the LoRA fused (`fuse_lora`): both write W0 + s B A,
    the product in fp32, rounded once."""
    folder = tiny_dir if base == "sdxl" else builtin_tiny_flux()
    reference = fresh(folder)
    reference.load_lora_weights(str(example_lora_path(subject)))
    reference.fuse_lora()
    expected = render(reference, **size)
    pipe = fresh(folder)
    with fuse(pipe, subject, style, method="subject", merged=True):
        assert torch.equal(render(pipe, **size), expected)


def on_accelerator(monkeypatch) -> None:
    """Merged routing as on a GPU (formed and written into the weights each time, no variants kept), run here."""
    monkeypatch.setattr("estlora.runtime.fusion.swaps_weights", lambda model, weights: False)


@pytest.mark.parametrize("where", ["host", "accelerator"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_merged_est_is_the_unfused_plan_and_the_base_comes_back_bit_for_bit(tiny_dir, dtype, where, monkeypatch):
    """20 images (fp32; 1 in half precision, slow on CPUs) with merged est: each as the exact unfused
    path renders it (within the weights' one rounding, which unfused routing does not have), and the
    base weights, after each image and after remove(), are the very ones loaded, in their own storage
    (written in place, never swapped)."""
    if where == "accelerator":
        on_accelerator(monkeypatch)
    pipe = fresh(tiny_dir, dtype)
    before = weights(pipe)
    storage = {name: p.data_ptr() for name, p in pipe.unet.named_parameters()}
    with fuse(pipe, "example:subject", "example:style", method="est", beta=0.5) as exact:
        expected = [render(pipe, seed) for seed in range(3 if dtype == "fp32" else 1)]
        assert (exact.plan_for(STEPS).weights[1:] != exact.plan_for(STEPS).weights[:-1]).any()  # it flips
    tolerance = {"fp32": 1e-5, "bf16": 0.1, "fp16": 2e-2}[dtype]
    with fuse(pipe, "example:subject", "example:style", method="est", beta=0.5, merged=True) as merged:
        assert merged.merged and merged.note == ""
        for seed in range(20 if dtype == "fp32" else 1):  # CPUs are slow in half precision
            image = render(pipe, seed)
            if seed < len(expected):
                assert (image.float() - expected[seed].float()).abs().max() <= tolerance
            after = pipe.unet.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before), seed  # restored after the last step
        assert merged.weights.swaps == (where == "host")
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {name: p.data_ptr() for name, p in pipe.unet.named_parameters()} == storage


def test_the_rows_written_are_the_plan_rows_of_each_step(tiny_dir):
    """A spy on the writes: at each denoiser call the weights hold that step's scales, and only the
    linears whose scales change are written."""
    from estlora.runtime.merged import MergedWeights

    pipe = fresh(tiny_dir)
    fusion = fuse(pipe, "example:subject", "example:style", method="est", beta=0.5, merged=True)
    seen, writes = [], []
    apply, write = MergedWeights.apply, MergedWeights._source

    def spy_apply(self, row):
        apply(self, row)
        seen.append(list(self.applied))

    def spy_write(self, index, scales, weight):
        writes.append(index)
        return write(self, index, scales, weight)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MergedWeights, "apply", spy_apply)
        patch.setattr(MergedWeights, "_source", spy_write)
        render(pipe)
    rows = fusion.scale_rows(fusion.plan_for(STEPS))
    assert seen[:STEPS] == rows[:STEPS]
    changed = sum(sum(a != b for a, b in zip(rows[i], rows[i - 1], strict=True)) for i in range(1, STEPS))
    touched = sum(1 for scales in rows[0] if any(scales))
    # first step: every projection that uses a LoRA; later: only those whose choice changes; at the
    # end each one written back to its base (restore)
    last = sum(1 for scales in rows[-1] if any(scales))
    assert len(writes) == touched + changed + last
    fusion.remove()


def test_quantized_weights_keep_the_unfused_path_and_say_so(tiny_dir):
    """Quantized (integer) weights cannot take a merge: the exact unfused path, and a note saying so."""
    pipe = fresh(tiny_dir)
    linear = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    linear.weight.requires_grad_(False)
    linear.weight.data = linear.weight.data.to(torch.int8)  # as a quantized base holds them
    fusion = fuse(pipe, "example:subject", "example:style", method="est", beta=0.5, merged=True)
    assert not fusion.merged and fusion.note == "--merge-weights: the base's weights are quantized; routed unfused"
    fusion.remove()


def test_a_flux_pipeline_that_has_rendered_still_swaps():
    """FLUX's pipeline leaves an empty diffusers hook registry on its transformer at its first image:
    a fusion made after that swaps as one made before (it once read the registry as an offload hook
    and formed every merged weight again at every image). A registry holding a hook still writes."""
    from diffusers.hooks import HookRegistry, ModelHook

    pipe = fresh(builtin_tiny_flux())
    render(pipe, width=32, height=32)
    registry = pipe.transformer._diffusers_hook
    assert isinstance(registry, HookRegistry) and registry.hooks == {}
    with fuse(pipe, "example:flux-subject", "example:flux-style", method="est", beta=0.5, merged=True) as fusion:
        assert fusion.weights.swaps
    registry.register_hook(ModelHook(), "probe")
    with fuse(pipe, "example:flux-subject", "example:flux-style", method="est", beta=0.5, merged=True) as fusion:
        assert fusion.merged and not fusion.weights.swaps


def test_offloaded_weights_keep_the_unfused_path_and_say_so(tiny_dir):
    """Sequential offload (accelerate's hooks; weights on the meta device, each linear's loaded from its
    own store per call) would silently drop every write: the exact unfused path, the image as with no
    `merged`, and a note. Offload enabled after a merged fusion is refused at the next write."""
    from accelerate import cpu_offload

    from estlora.errors import FusionError

    reference = fresh(tiny_dir)
    cpu_offload(reference.unet, execution_device=torch.device("cpu"))
    with fuse(reference, "example:subject", "example:style", method="est", beta=0.5):
        expected = render(reference)
    pipe = fresh(tiny_dir)
    cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
    with fuse(pipe, "example:subject", "example:style", method="est", beta=0.5, merged=True) as fusion:
        assert not fusion.merged
        assert (
            fusion.note == "--merge-weights: the base's weights are offloaded (sequential CPU offload); routed unfused"
        )
        assert torch.equal(render(pipe), expected)
    late = fresh(tiny_dir)
    with fuse(late, "example:subject", "example:style", method="est", beta=0.5, merged=True) as fusion:
        assert fusion.merged
        cpu_offload(late.unet, execution_device=torch.device("cpu"))
        with pytest.raises(FusionError, match="offloaded .sequential CPU offload. after fusing"):
            render(late)


def test_later_images_swap_in_kept_variants_and_render_the_same(tiny_dir, monkeypatch):
    """From the second image on, no merged weight is formed again and none is copied: at every step
    each routed weight's data is its kept W0 or one of its kept variants (at most VARIANTS per linear),
    the image is bit for bit the first, and each weight ends on W0's own tensor."""
    from estlora.runtime import merged as module

    monkeypatch.setattr(module, "spare_bytes", lambda: 2**40)  # whatever this machine has free
    pipe = fresh(tiny_dir)
    storage = {name: p.data_ptr() for name, p in pipe.unet.named_parameters()}
    formed, copies, held = [], [], []
    form = module.applied

    def spy(update, scale):
        formed.append(scale)
        return form(update, scale)

    with fuse(pipe, "example:subject", "example:style", method="est", beta=0.5, merged=True) as fusion:
        weights = fusion.weights
        assert weights.swaps
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(module, "applied", spy)
            first = render(pipe)
            assert formed
            formed.clear()
            patch.setattr(module.torch, "_foreach_copy_", lambda *a: copies.append(a))

            def spy_step(*_):
                tensors = [
                    {t.data_ptr() for t in (kept, *variants.values())}
                    for kept, variants in zip(weights.kept, weights.variants, strict=True)
                ]
                held.append(all(w.weight.data_ptr() in t for w, t in zip(weights.linears, tensors, strict=True)))

            # registered after the fusion's own hook, so it sees the step's weights
            hook = pipe.unet.register_forward_pre_hook(spy_step)
            second = render(pipe)
            hook.remove()
        assert formed == [] and copies == [] and torch.equal(first, second)
        assert len(held) == STEPS and all(held)
        variants = weights.variants
        assert max(len(v) for v in variants) == 2 <= module.VARIANTS
        rows = fusion.scale_rows(fusion.plan_for(STEPS))
        assert [set(v) for v in variants] == [{s for s in column if any(s)} for column in zip(*rows, strict=True)]
        assert {name: p.data_ptr() for name, p in pipe.unet.named_parameters()} == storage
    assert weights.variants == [{}] * len(weights.linears)  # removed: held elsewhere, it pins no memory
    assert {name: p.data_ptr() for name, p in pipe.unet.named_parameters()} == storage


@pytest.mark.parametrize("swaps", [True, False], ids=["swapped", "written"])
def test_variants_are_what_the_write_forms_and_the_oldest_goes_first(monkeypatch, swaps):
    """One linear through three scales: the weight holds W0 + s B A rounded once each time, whether
    formed or taken from a kept variant. Swapped (the CPU): a third variant drops the least recently
    used, a swapped-in weight sits at W0's offset from a 64-byte boundary, W0's own tensor comes back,
    and with no memory to spare none is kept. Written (accelerators): in place, none kept."""
    from estlora.runtime import merged as module
    from estlora.updates import LoraFactors

    monkeypatch.setattr(module, "spare_bytes", lambda: 2**40)
    torch.manual_seed(0)
    room = torch.empty(24 * 16 + 3, dtype=torch.float16)
    linear = torch.nn.Linear(16, 24).to(torch.float16).requires_grad_(False)
    linear.weight.data = room[3:].view(24, 16).copy_(linear.weight)  # as a weight in a safetensors file sits
    base = linear.weight.clone()
    update = LoraFactors(down=torch.randn(4, 16), up=torch.randn(24, 4), alpha=4.0)
    weights = module.MergedWeights([linear], [(update, None)], swaps=swaps)

    def expected(scale):
        return (base.float() + scale * (update.up @ update.down)).to(torch.float16)

    original = linear.weight.data_ptr()
    for scale in (1.0, 0.5, 1.0, 2.0, 0.5, 1.0):
        weights.apply([(scale, 0.0)])
        assert torch.equal(linear.weight, expected(scale)), scale
        assert (linear.weight.data_ptr() != original) == swaps  # swapped in, or written in place
        assert linear.weight.data_ptr() % 64 == original % 64
        weights.restore()
        assert torch.equal(linear.weight, base) and linear.weight.data_ptr() == original
    if not swaps:
        assert weights.variants == [{}]
        return
    assert list(weights.variants[0]) == [(0.5, 0.0), (1.0, 0.0)]  # 2.0 dropped, then 0.5 formed again
    monkeypatch.setattr(module, "spare_bytes", lambda: 0)
    spare = module.MergedWeights([linear], [(update, None)], swaps=True)
    spare.apply([(1.0, 0.0)])
    assert torch.equal(linear.weight, expected(1.0)) and spare.variants == [{}]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["host", "accelerator"])
def test_torch_compile_keeps_one_graph_as_the_weights_change(tiny_dir, graphs, where, monkeypatch):
    """Merged routing writes the weights' values in place, never their tensors (variants kept or
    not): a compiled UNet builds its graphs in the first run and none after (more
    images, another step count), and renders what the eager merged run renders (a backend that runs
    the captured graphs as they are)."""
    if where == "accelerator":
        on_accelerator(monkeypatch)
    pipe = fresh(tiny_dir)
    with fuse(pipe, "example:subject", "example:style", method="est", beta=0.5, merged=True):
        eager = [render(pipe, seed) for seed in (0, 1)] + [render(pipe, 0, num_inference_steps=STEPS + 2)]
        pipe.unet.compile(backend=graphs.backend)
        compiled = [render(pipe, 0)]
        built = len(graphs)
        compiled += [render(pipe, 1), render(pipe, 0, num_inference_steps=STEPS + 2)]
    assert 0 < built and len(graphs) == built, "new weights or a new step count must not recompile"
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager, strict=True))


def test_no_variant_is_kept_past_the_memory_reserve(monkeypatch):
    """Variants stop where the spare memory (read once per write batch) runs out: with room for one
    weight, the second linear formed in the same step keeps none; the spare memory the machine reports
    is bounded by what it has."""
    from estlora.runtime import merged as module
    from estlora.updates import LoraFactors

    linears = [torch.nn.Linear(16, 24).requires_grad_(False) for _ in range(2)]
    update = LoraFactors(down=torch.randn(4, 16), up=torch.randn(24, 4), alpha=4.0)
    reads = []
    monkeypatch.setattr(module, "spare_bytes", lambda: reads.append(1) or 24 * 16 * 4 + 1)
    weights = module.MergedWeights(linears, [(update, None)] * 2, swaps=True)
    weights.apply([(1.0, 0.0), (1.0, 0.0)])
    assert [len(v) for v in weights.variants] == [1, 0] and len(reads) == 1
    monkeypatch.undo()
    assert 0 <= module.spare_bytes() < 2**42  # less than the 4 TiB a weight of 2**40 fp32 values would take


@pytest.mark.parametrize("swaps", [True, False], ids=["swapped", "written"])
def test_a_model_cast_after_fusing_is_written_in_its_new_dtype_and_the_kept_copies_stay(monkeypatch, swaps):
    """Cast to fp16 after fusing: each merge is the fp32 merge rounded once to fp16 (a variant kept
    in fp32 is not used), W0 comes back rounded, and the kept W0 is never written."""
    from estlora.runtime import merged as module
    from estlora.updates import LoraFactors

    monkeypatch.setattr(module, "spare_bytes", lambda: 2**40)
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 24).requires_grad_(False)
    base = linear.weight.clone()
    update = LoraFactors(down=torch.randn(4, 16), up=torch.randn(24, 4), alpha=4.0)
    merged = (base + 0.5 * (update.up @ update.down)).half()
    weights = module.MergedWeights([linear], [(update, None)], swaps=swaps)
    weights.apply([(0.5, 0.0)])  # a variant in fp32, then the model cast
    weights.restore()
    linear.half()
    for _ in range(2):
        weights.apply([(0.5, 0.0)])
        assert linear.weight.dtype == torch.float16 and torch.equal(linear.weight, merged)
        weights.restore()
        assert torch.equal(linear.weight, base.half())
    assert torch.equal(weights.kept[0], base)


def test_a_render_stopped_between_steps_leaves_the_base_weights(tiny_dir):
    """The UI's Stop (an exception from the step callback) never reaches the last step's restore: the
    session puts the base back on the way out, so a save or a state dict sees the base, not a merge."""
    from estlora.config import FusionConfig, ModelConfig, SamplingConfig
    from estlora.session import Request, Session

    session = Session.open(ModelConfig(base=str(tiny_dir), merge_weights=True), report=lambda _: None)
    try:
        before = weights(session.pipe)
        request = Request(
            "example:subject", "example:style", "a sks dog", FusionConfig(beta=0.5), SamplingConfig(steps=STEPS)
        )
        prepared = session.configure(request)
        assert prepared.fusion.merged

        def stop(pipe, step, timestep, kwargs):
            if step == 1:
                assert not all(torch.equal(before[k], v) for k, v in weights(pipe).items())  # merged now
                raise KeyboardInterrupt
            return kwargs

        with pytest.raises(KeyboardInterrupt):
            session.render(prepared, seed=0, callback=stop)
        assert all(torch.equal(before[k], v) for k, v in weights(session.pipe).items())
    finally:
        session.close()
