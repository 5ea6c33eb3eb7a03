"""Train the toy world's models from scratch on a CPU: scorer, VAE, base model, then one LoRA per concept.

    python -m estlora.toy.training all                    # everything, in order (about 2.3 hours on 2 cores)
    python -m estlora.toy.training base --max-minutes 30  # one chunk; run it again to resume

Each stage is seeded and checkpointed (`<work>/<stage>/checkpoint.pt`, every 200 steps and when a
chunk's time is up), and a batch depends only on (stage, seed, step), so a resumed run continues
exactly where it stopped. Finished stages write into `--out` (by default the package's
`toy/assets/`): `scorer.safetensors`, `model/` (the pipeline, EMA weights) and
`loras/<name>.safetensors` (diffusers format, as the DreamBooth LoRA scripts save them);
`training.json` there records each stage's settings, wall time and measurements.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..outputs import atomic_path, write_text
from .model import ASSETS, LORA_TARGETS, build_toy_pipeline
from .world import SHAPES, SIZE, STYLES, SUBJECTS, TEXTURES, batch, random_scene, render, to_tensor

STAGE_SEEDS = {"scorer": 1, "vae": 2, "base": 3, **{name: 10 + i for i, name in enumerate(SUBJECTS + STYLES)}}
SETTINGS = {
    # steps, batch, peak learning rate; `schedule`: the steps the learning-rate schedule spans, when
    # training stops before its end (the base: planned for 5500, stopped at 4000 to fit the world's budget)
    "scorer": dict(steps=1500, batch=64, lr=2e-3),
    "vae": dict(steps=1000, batch=32, lr=1e-3),
    "base": dict(steps=4000, schedule=5500, batch=24, lr=1.5e-3),
    "lora": dict(steps=2500, batch=16, lr=4e-3, rank=8, prior=0.5, drop_colour=0.5),
}
CAPTION_DROPOUT = 0.1  # to all-zero embeddings, as the pipeline's unconditional branch is
EMA_DECAY = 0.999
TIME_IDS = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)  # original size, crop, target


def learning_rate(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def generator(*seed: int) -> torch.Generator:
    """A generator for (stage, seed, step): a tuple of ints hashes the same in every process."""
    return torch.Generator().manual_seed(hash(seed) % 2**63)


def run_steps(
    work: Path,
    label: str,
    objects: dict[str, object],
    total: int,
    step: Callable[[int], float],
    max_minutes: float | None,
    every: int = 200,
) -> dict | None:
    """Run step(i) for i up to `total`, resuming from and saving `work/checkpoint.pt`.

    objects: what the checkpoint holds (modules, optimizers). Returns the run's record when all steps
    are done, None when the chunk's time ran out first (run again to resume).
    """
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "checkpoint.pt"
    first, elapsed, losses = 0, 0.0, []
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        for name, obj in objects.items():
            obj.load_state_dict(saved[name])
        first, elapsed, losses = saved["step"], saved["elapsed"], saved["losses"]
        print(f"{label}: resuming at step {first}/{total}", flush=True)

    def save(done: int) -> None:
        with atomic_path(checkpoint) as staging:
            state = {name: obj.state_dict() for name, obj in objects.items()}
            torch.save({**state, "step": done, "elapsed": elapsed, "losses": losses}, staging)

    start, window, since = time.perf_counter(), [], first
    for i in range(first, total):
        window.append(step(i))
        now = time.perf_counter()
        if (i + 1) % 50 == 0 or i + 1 == total:
            losses.append((i + 1, sum(window) / len(window)))
            rate = (now - start) / (i + 1 - since)
            print(
                f"{label}: step {i + 1}/{total} loss {losses[-1][1]:.4f} {rate:.2f} s/step "
                f"eta {rate * (total - i - 1) / 60:.1f} min",
                flush=True,
            )
            window = []
        out_of_time = max_minutes is not None and now - start > 60 * max_minutes
        if (i + 1) % every == 0 or i + 1 == total or out_of_time:
            elapsed += now - start
            start, since = now, i + 1
            save(i + 1)
            if out_of_time and i + 1 < total:
                print(f"{label}: chunk time is up at step {i + 1}; run again to resume", flush=True)
                return None
    return {"steps": total, "wall_seconds": round(elapsed, 1), "threads": torch.get_num_threads(), "loss": losses}


def record(out: Path, stage: str, entry: dict) -> None:
    """Add one stage's record to `out/training.json`."""
    path = out / "training.json"
    records = json.loads(path.read_text()) if path.exists() else {}
    records[stage] = entry
    write_text(path, json.dumps(records, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- scorer


def train_scorer(work: Path, out: Path, seed: int, max_minutes: float | None) -> bool:
    from safetensors.torch import save_file

    from .scorer import HEADS, ToyScorer, scorer_batch

    s = SETTINGS["scorer"]
    torch.manual_seed(seed)
    scorer = ToyScorer()
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=s["lr"], weight_decay=1e-4)

    def step(i: int) -> float:
        images, labels = scorer_batch(s["batch"], [STAGE_SEEDS["scorer"], seed, i])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(i, s["steps"], s["lr"])
        logits = scorer(to_tensor(images))
        loss = sum(F.cross_entropy(logits[h], labels[h]) for h in HEADS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    entry = run_steps(
        work / "scorer", "scorer", {"model": scorer, "optimizer": optimizer}, s["steps"], step, max_minutes
    )
    if entry is None:
        return False
    entry["accuracy"] = scorer_accuracy(scorer.eval())
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "scorer.safetensors") as staging:
        save_file({k: v.contiguous() for k, v in scorer.state_dict().items()}, str(staging))
    record(out, "scorer", {**s, **entry})
    print(f"scorer: held-out accuracy {entry['accuracy']}", flush=True)
    return True


def scorer_accuracy(scorer, n: int = 600) -> dict:
    """Accuracy on fresh clean renders of every concept (a seed training never used), and on noise."""
    import numpy as np

    from .scorer import NONE, noise_image, predict

    rng = np.random.default_rng([99, 99])
    scenes = [random_scene(rng, SHAPES, TEXTURES) for _ in range(n)]
    predictions = predict(scorer, np.stack([render(sc) for sc in scenes]))
    result = {
        head: round(
            sum(getattr(p, head) == getattr(sc, head) for p, sc in zip(predictions, scenes, strict=True)) / n, 4
        )
        for head in ("shape", "colour", "texture")
    }
    noise = predict(scorer, np.stack([noise_image(rng) for _ in range(n // 2)]))
    result["noise_called_none"] = {
        head: round(sum(getattr(p, head) == NONE for p in noise) / len(noise), 4)
        for head in ("shape", "colour", "texture")
    }
    return result


# ---------------------------------------------------------------- VAE


def train_vae(work: Path, out: Path, seed: int, max_minutes: float | None) -> bool:
    import numpy as np

    from .model import toy_vae

    s = SETTINGS["vae"]
    torch.manual_seed(seed)
    vae = toy_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=s["lr"], weight_decay=0.0)

    def images(i: int) -> torch.Tensor:  # every shape and texture: the VAE must draw what only LoRAs teach
        rng = np.random.default_rng([STAGE_SEEDS["vae"], seed, i])
        return to_tensor(np.stack([render(random_scene(rng, SHAPES, TEXTURES)) for _ in range(s["batch"])]))

    def step(i: int) -> float:
        x = images(i)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(i, s["steps"], s["lr"])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator(seed, i))
        reconstruction = vae.decode(z).sample
        loss = F.mse_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    entry = run_steps(work / "vae", "vae", {"model": vae, "optimizer": optimizer}, s["steps"], step, max_minutes)
    if entry is None:
        return False
    vae.eval()
    with torch.no_grad():
        x = images(10**6)
        latents = vae.encode(x).latent_dist.mean
        scale = float(1 / latents.std())
        reconstruction = vae.decode(latents).sample.clamp(-1, 1)
    vae.register_to_config(scaling_factor=scale)
    psnr = float(10 * torch.log10(4 / F.mse_loss(reconstruction, x)))
    entry.update(scaling_factor=round(scale, 5), psnr_db=round(psnr, 2))
    shutil.rmtree(work / "vae" / "model", ignore_errors=True)
    vae.save_pretrained(work / "vae" / "model")
    record(out, "vae", {**s, **entry})
    print(f"vae: PSNR {psnr:.1f} dB on held-out images, scaling factor {scale:.4f}", flush=True)
    return True


# ---------------------------------------------------------------- diffusion (base and LoRAs)


class Diffusion:
    """What one epsilon-prediction training step needs, matching what the pipeline does at sampling."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.float()

    def loss(self, images, captions: list[str], g: torch.Generator, text_grad: bool) -> torch.Tensor:
        pipe, n = self.pipe, len(captions)
        with torch.no_grad():
            latents = pipe.vae.encode(to_tensor(images)).latent_dist.mean * pipe.vae.config.scaling_factor
        with torch.set_grad_enabled(text_grad):
            embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
        keep = (torch.rand(n, generator=g) >= CAPTION_DROPOUT).float()
        embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, len(self.alphas_cumprod), (n,), generator=g)
        a = self.alphas_cumprod[t].view(n, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        conditions = {"text_embeds": pooled, "time_ids": TIME_IDS.expand(n, 6)}
        prediction = pipe.unet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=conditions).sample
        return F.mse_loss(prediction, noise)


def train_base(work: Path, out: Path, seed: int, max_minutes: float | None) -> bool:
    from diffusers import AutoencoderKL

    s = SETTINGS["base"]
    pipe = build_toy_pipeline(seed)
    pipe.vae = AutoencoderKL.from_pretrained(work / "vae" / "model")
    pipe.vae.requires_grad_(False)
    trained = torch.nn.ModuleDict(
        {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    )
    ema = copy.deepcopy(trained).requires_grad_(False)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=s["lr"], weight_decay=0.01)
    diffusion = Diffusion(pipe)

    def step(i: int) -> float:
        images, captions, _ = batch("base", s["batch"], [STAGE_SEEDS["base"], seed, i])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(i, s.get("schedule", s["steps"]), s["lr"])
        loss = diffusion.loss(images, captions, generator(STAGE_SEEDS["base"], seed, i), text_grad=True)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        decay = min(EMA_DECAY, (1 + i) / (10 + i))
        torch._foreach_lerp_(list(ema.parameters()), list(trained.parameters()), 1 - decay)
        return loss.item()

    objects = {"model": trained, "ema": ema, "optimizer": optimizer}
    entry = run_steps(work / "base", "base", objects, s["steps"], step, max_minutes)
    if entry is None:
        return False
    trained.load_state_dict(ema.state_dict())
    save_pipeline(pipe, out / "model")
    record(out, "base", {**s, **entry, "ema_decay": EMA_DECAY, "caption_dropout": CAPTION_DROPOUT})
    return True


def save_pipeline(pipe, target: Path) -> None:
    """Replace `target` with the pipeline's folder in one rename (never half-written)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".model.", dir=target.parent))
    pipe.save_pretrained(staging)
    for path in [staging, *staging.rglob("*")]:  # mkdtemp and safetensors make their output private
        path.chmod(0o755 if path.is_dir() else 0o644)
    old = target.with_name(target.name + ".old")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def train_lora(name: str, work: Path, out: Path, seed: int, max_minutes: float | None) -> bool:
    """A DreamBooth LoRA on the attention projections, with prior preservation and caption dropout."""
    entry = fit_lora(name, work, out, seed, max_minutes)
    if entry is not None:
        record(out, f"lora:{name}", entry)
    return entry is not None


def train_loras(names: list[str], work: Path, out: Path, seed: int, deadline: float | None, jobs: int) -> bool:
    """Several LoRAs, `jobs` at a time, each in its own process on its share of the threads.

    The toy UNet is too small to keep two threads busy: on 2 cores, two one-thread runs side by side
    train 1.65 times as many steps per second as one two-thread run, to the same weights (a batch
    depends only on its seed). The records are written here, one at a time, as each run ends.
    """
    if jobs <= 1:
        return all(train_lora(n, work, out, seed, _minutes_left(deadline)) for n in names)
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    threads = max(1, torch.get_num_threads() // jobs)
    with ProcessPoolExecutor(jobs, get_context("spawn"), initializer=_worker, initargs=(threads, SETTINGS)) as pool:
        runs = {pool.submit(_fit_until, n, work, out, seed, deadline): n for n in names}
        finished = True
        for run, name in runs.items():
            entry = run.result()
            if entry is None:
                finished = False
            else:
                record(out, f"lora:{name}", entry)
    return finished


def _minutes_left(deadline: float | None) -> float | None:
    return None if deadline is None else (deadline - time.time()) / 60


def _worker(threads: int, settings: dict) -> None:
    torch.set_num_threads(threads)
    SETTINGS.update(settings)  # a spawned process starts from the module's own; the caller's may differ


def _fit_until(name: str, work: Path, out: Path, seed: int, deadline: float | None) -> dict | None:
    return fit_lora(name, work, out, seed, _minutes_left(deadline))  # the time left when this run starts


def fit_lora(name: str, work: Path, out: Path, seed: int, max_minutes: float | None) -> dict | None:
    """Train (or resume) one LoRA and save it; its record, or None when the chunk's time ran out."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    s = SETTINGS["lora"]
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out / "model"))
    for part in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.requires_grad_(False)
    torch.manual_seed(seed + STAGE_SEEDS[name])
    pipe.unet.add_adapter(LoraConfig(r=s["rank"], lora_alpha=s["rank"], target_modules=LORA_TARGETS))
    parameters = [p for p in pipe.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=s["lr"], weight_decay=0.0)
    diffusion = Diffusion(pipe)
    lora_state = _LoraState(pipe.unet)

    def step(i: int) -> float:
        images, captions, _ = batch(name, s["batch"], [STAGE_SEEDS[name], seed, i], s["prior"], s["drop_colour"])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(i, s["steps"], s["lr"], warmup=50)
        loss = diffusion.loss(images, captions, generator(STAGE_SEEDS[name], seed, i), text_grad=False)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        return loss.item()

    entry = run_steps(work / name, name, {"lora": lora_state, "optimizer": optimizer}, s["steps"], step, max_minutes)
    if entry is None:
        return None
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    target = out / "loras" / f"{name}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as staging:
        StableDiffusionXLPipeline.save_lora_weights(staging, unet_lora_layers=layers, weight_name=target.name)
        os.replace(Path(staging) / target.name, target)
    target.chmod(0o644)  # a temporary folder makes its files private
    return {**s, **entry, "alpha": s["rank"], "targets": LORA_TARGETS}


class _LoraState:
    """The LoRA factors of a peft-wrapped UNet, with the state_dict interface a checkpoint needs."""

    def __init__(self, unet):
        self.unet = unet

    def state_dict(self) -> dict:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.unet)

    def load_state_dict(self, state: dict) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.unet, state)


# ---------------------------------------------------------------- command line

STAGES: dict[str, Callable[..., bool]] = {"scorer": train_scorer, "vae": train_vae, "base": train_base}


def run_stage(stage: str, work: Path, out: Path, seed: int, max_minutes: float | None) -> bool:
    if stage in STAGES:
        return STAGES[stage](work, out, seed, max_minutes)
    return train_lora(stage, work, out, seed, max_minutes)


def main(argv: list[str] | None = None) -> int:
    order = [*STAGES, *SUBJECTS, *STYLES]
    parser = argparse.ArgumentParser(prog="python -m estlora.toy.training", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=[*order, "all", "loras"])
    parser.add_argument("--work", type=Path, default=Path("toy-training"), help="checkpoints (default ./toy-training)")
    parser.add_argument("--out", type=Path, default=ASSETS, help="where finished weights go (default: the package's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, help="stop (resumably) after this long")
    parser.add_argument("--jobs", type=int, default=2, help="LoRAs trained side by side, each in its own "
                        "process on its share of the threads (default 2: the fastest on 2 cores)")  # fmt: skip
    args = parser.parse_args(argv)
    stages = {"all": order, "loras": [*SUBJECTS, *STYLES]}.get(args.stage, [args.stage])
    if args.stage in ("all", "loras"):
        stages = [stage for stage in stages if not _finished(stage, args.out)]
    deadline = None if args.max_minutes is None else time.time() + 60 * args.max_minutes
    for stage in [s for s in stages if s in STAGES]:
        if not run_stage(stage, args.work, args.out, args.seed, _minutes_left(deadline)):
            return 3  # out of time: resumable
    loras = [s for s in stages if s not in STAGES]
    if loras and not train_loras(loras, args.work, args.out, args.seed, deadline, min(args.jobs, len(loras))):
        return 3
    return 0


def _finished(stage: str, out: Path) -> bool:
    path = out / "training.json"
    key = stage if stage in STAGES else f"lora:{stage}"
    return path.exists() and key in json.loads(path.read_text())


if __name__ == "__main__":
    raise SystemExit(main())
