"""Shared fixtures: everything offline, one tiny SDXL folder per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)  # numerics depend slightly on the thread count


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the built-in model/example cache inside the test session."""
    os.environ["ESTLORA_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from estlora.testing.tiny_sdxl import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def dino_dir(tmp_path_factory):
    from estlora.testing.tiny_encoders import write_tiny_dino

    return write_tiny_dino(tmp_path_factory.mktemp("encoders") / "tiny-dino")


@pytest.fixture
def graphs() -> Iterator[_Graphs]:
    """The graphs torch.compile builds with `graphs.backend`, which runs each as captured (so results
    compare bit for bit with eager runs); dynamo's caches are emptied before and after."""
    import torch._dynamo

    torch._dynamo.reset()
    built = _Graphs()
    yield built
    torch._dynamo.reset()


class _Graphs(list):
    def backend(self, graph, example_inputs):
        self.append(graph)
        return graph.forward


@pytest.fixture(scope="session")
def tiny_shapes():
    """The tiny SDXL's 560 attention projections, (out, in) each."""
    from estlora.testing.tiny_sdxl import tiny_unet

    return attention_shapes(dict(tiny_unet().config))


def attention_shapes(unet_config: dict, route: str = "attention") -> dict[str, tuple[int, int]]:
    """(out, in) of the linears an SDXL UNet config's route set covers (attention: 560, blocks: 722)."""
    from estlora.families import family_named

    sdxl = family_named("sdxl")
    return {m: shape for m, shape in sdxl.shapes_from_config(unet_config).items() if sdxl.in_route(m, route)}


def random_lora(shapes: dict[str, tuple[int, int]], rank: int, alpha: float, seed: int, name: str = "lora"):
    """A Lora built in memory (no file): random factors for the given (out, in) shapes."""
    from estlora.updates import Lora, LoraFactors

    generator = torch.Generator().manual_seed(seed)
    projections = {
        module: LoraFactors(
            down=torch.randn(rank, n, generator=generator),
            up=torch.randn(o, rank, generator=generator) * float(torch.rand((), generator=generator) + 0.1),
            alpha=alpha,
        )
        for module, (o, n) in shapes.items()
    }
    return Lora(
        source=name, path=name, layout="diffusers-peft", projections=projections, sha256=f"{name}-{seed}", family="sdxl"
    )


def load_pipeline(folder):
    """A diffusers pipeline from a (tiny) folder, its class from model_index.json, progress bars off."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, prompt: str = "a photo of sks dog", steps: int = 2, seed: int = 0, **kwargs):
    """A short 32 x 32 run's latents, seeded (FLUX.1 pipelines: a 16-token T5 prompt)."""
    if type(pipe).__name__.startswith("Flux"):
        kwargs.setdefault("max_sequence_length", 16)
    return pipe(
        prompt,
        num_inference_steps=steps,
        height=32,
        width=32,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).images
