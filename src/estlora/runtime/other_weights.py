"""LoRA weights outside the routed linears: left out (the reference) or applied statically.

EST-LoRA routes the denoiser's attention projections (or, with route `blocks`, every linear of its
transformer blocks). A kohya / Civitai LoRA, or one trained with `--train_text_encoder`, also changes
other layers, convolutions and the text encoders. The reference ignores those parts (policy
`ignore`). Under policy `merge` each LoRA's other part is loaded by diffusers' own loader, as a peft
adapter, exactly as `load_lora_weights` would load it from the whole file, and applied for the whole
run at that LoRA's strength, as `set_adapters` does. So `method="subject"` with `merge` gives what a
plain diffusers run with the subject LoRA gives. ComfyUI's full-weight differences, which diffusers'
loader drops, are added to the weights they name as ComfyUI adds them (`WeightDiffs`).

The user's own adapters stay active at their own scales; ours are added to each layer's active set.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import LoraFormatError
from ..families import ModelFamily
from ..files.lora_keys import module_of
from ..scores import dense_of
from ..updates import Lora, Update

DIFF_SUFFIXES = (".diff", ".diff_b")


def describe(
    role: str, family: ModelFamily, tensors: dict[str, torch.Tensor], strength: float, policy: str
) -> str | None:
    """One line saying what happens to a LoRA's weights outside the routed linears (None if it has none)."""
    if not tensors:
        return None
    kinds = ", ".join(family.other_modules(tensors))
    what = f"{role} LoRA: {len(tensors)} tensors outside the routed linears ({kinds})"
    if policy == "ignore":
        return f"{what}: ignored, as the reference does (--other-weights merge applies them)"
    return f"{what}: merged statically at strength {strength:g}"


def components(pipe, family: ModelFamily) -> list:
    """The parts diffusers loads LoRA weights into (the denoiser and the text encoders)."""
    parts = [getattr(pipe, name, None) for name in family.lora_components]
    return [part for part in parts if part is not None]


def tuner_layers(pipe, family: ModelFamily) -> list:
    """Every peft LoRA layer in the pipeline's denoiser and text encoders."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for c in components(pipe, family) for m in c.modules() if isinstance(m, BaseTunerLayer)]


class StaticAdapters:
    """Each LoRA's non-attention part as a peft adapter of the pipeline, at a strength set per run."""

    def __init__(
        self,
        pipe,
        family: ModelFamily,
        loras: dict[str, Lora],
        tensors: dict[str, dict[str, torch.Tensor]],
        updates: dict[str, dict[str, Update]] | None = None,
    ):
        """`loras`: role ("subject", "style") -> LoRA; `tensors`: role -> its tensors to load (those
        outside the route, under the loader's names); `updates`: role -> its LoKr / LoHa projections
        outside the route (`Lora.unrouted_updates`), which estlora merges itself; a role with none is
        skipped."""
        self.pipe, self.family = pipe, family
        # peft freezes what it loads adapters into; remove() gives every parameter its flag back.
        self.requires_grad = {p: p.requires_grad for c in components(pipe, family) for p in c.parameters()}
        had_adapters = bool(tuner_layers(pipe, family))
        self.user_adapters = list(pipe.get_active_adapters()) if had_adapters else []
        self.restore_modules = not had_adapters  # nothing of peft's was here: unload it all on remove()
        self.names: dict[str, list[str]] = {}  # role -> its adapters (one per group of key names)
        diffs = {role: {k: v for k, v in part.items() if k.endswith(DIFF_SUFFIXES)} for role, part in tensors.items()}
        tensors = {role: {k: v for k, v in part.items() if k not in diffs[role]} for role, part in tensors.items()}
        for role, lora in loras.items():
            _check_loadable(lora, tensors[role])
        self.diffs = WeightDiffs(pipe, family, loras, diffs, updates or {})  # checked before anything is loaded
        try:
            for role, lora in loras.items():
                for i, group in enumerate(family.adapter_groups(tensors[role])):
                    name = f"estlora-{role}-{lora.sha256[:8]}" + (f"-{i}" if i else "")
                    self.names.setdefault(role, []).append(name)
                    _load(pipe, lora, group, name)
        except BaseException:
            self.remove()
            raise
        self.set_weights({})

    def set_weights(self, weights: dict[str, float]) -> None:
        """Strength per role; a LoRA at zero is left out of the active set, so nothing is computed for it."""
        self.diffs.set_weights(weights)
        strengths = {role: float(weights.get(role, 0.0)) for role in self.names}
        active = self.user_adapters + [name for role, names in self.names.items() if strengths[role] for name in names]
        for layer in tuner_layers(self.pipe, self.family):
            layer.set_adapter(active)
            for role, names in self.names.items():
                for name in names:
                    layer.set_scale(name, strengths[role])

    def remove(self) -> None:
        """Delete our adapters; the user's adapters are active again as before, or peft is gone if it was."""
        self.diffs.remove()
        if self.names:
            if self.restore_modules:
                self.pipe.unload_lora_weights()
            else:
                loaded = {name for names in self.pipe.get_list_adapters().values() for name in names}
                ours = [name for names in self.names.values() for name in names]
                self.pipe.delete_adapters([name for name in ours if name in loaded])
                for layer in tuner_layers(self.pipe, self.family):
                    layer.set_adapter(self.user_adapters)
        for parameter, flag in self.requires_grad.items():
            parameter.requires_grad_(flag)
        self.names = {}


class WeightDiffs:
    """Weights diffusers' loader drops or cannot read, added to the pipeline's parameters as their own
    tools add them, W + strength * delta per LoRA: ComfyUI's full-weight differences (`.diff` on
    weights and norms, `.diff_b` on biases) and LyCORIS' LoKr / LoHa updates of linears outside the
    route (delta = scale * delta W, as LyCORIS merges them). The parameters they touch are copied
    first and put back by `remove()`."""

    def __init__(
        self,
        pipe,
        family: ModelFamily,
        loras: dict[str, Lora],
        diffs: dict[str, dict[str, torch.Tensor]],
        updates: dict[str, dict[str, Update]],
    ):
        self.parameters: dict[str, torch.nn.Parameter] = {}
        # per role, (parameter, its delta): a diff as the file holds it, or an update formed when applied
        # (a dense copy of every merged linear would cost what those weights cost)
        self.diffs: dict[str, list[tuple[str, Callable[[], torch.Tensor]]]] = {}
        for role, part in diffs.items():
            for key, diff in part.items():
                target = family.diff_target(key)
                if target is None:
                    raise LoraFormatError(
                        loras[role].path,
                        f"{key}: a full-weight difference estlora does not place on {family.label} (diffusers drops"
                        " them); use --other-weights ignore",
                    )
                self._add(pipe, loras[role], role, key, target, diff.shape, lambda diff=diff: diff)
        for role, part in updates.items():
            for module, update in part.items():
                shape = torch.Size((update.out_features, update.in_features))
                target = (family.denoiser, f"{module}.weight")
                self._add(pipe, loras[role], role, module, target, shape, lambda u=update: dense_of(u) * u.scale)
        self.originals = {name: p.detach().clone() for name, p in self.parameters.items()}

    def _add(self, pipe, lora: Lora, role: str, key: str, target: tuple[str, str], shape, delta) -> None:
        parameter = _parameter(pipe, target)
        if parameter is None or parameter.shape != shape:
            why = "names no parameter of the pipeline" if parameter is None else (
                f"has shape {tuple(shape)}, the parameter {tuple(parameter.shape)}"
            )
            raise LoraFormatError(lora.path, f"{key}: a weight to merge that {why}")
        self.parameters[".".join(target)] = parameter
        self.diffs.setdefault(role, []).append((".".join(target), delta))

    def set_weights(self, weights: dict[str, float]) -> None:
        with torch.no_grad():
            for name, original in self.originals.items():
                self.parameters[name].copy_(original)
            for role, entries in self.diffs.items():
                strength = float(weights.get(role, 0.0))
                for name, delta in entries if strength else ():
                    parameter = self.parameters[name]
                    parameter.add_(delta().to(device=parameter.device, dtype=parameter.dtype), alpha=strength)

    def remove(self) -> None:
        with torch.no_grad():
            for name, original in self.originals.items():
                self.parameters[name].copy_(original)
        self.originals = {}


def _parameter(pipe, target: tuple[str, str]) -> torch.nn.Parameter | None:
    if getattr(pipe, target[0], None) is None:
        return None
    module_path, _, name = target[1].rpartition(".")
    try:
        module = getattr(pipe, target[0]).get_submodule(module_path)
    except AttributeError:
        return None
    parameter = getattr(module, name, None)
    return parameter if isinstance(parameter, torch.Tensor) else None


def _check_loadable(lora: Lora, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse, in one line, weights diffusers' loader would drop or fail on: LyCORIS' DoRA magnitudes
    and LoKr / LoHa parts outside the routed linears."""
    dora = [key for key in tensors if key.endswith(".dora_scale")]
    if dora:
        raise LoraFormatError(
            lora.path,
            f"its {len(dora)} DoRA magnitudes outside the routed linears (e.g. {dora[0]}) cannot be merged"
            " (diffusers' loader drops dora_scale and would apply a plain LoRA); route them (--route blocks) or use"
            " --other-weights ignore",
        )
    kinds = [key for key in tensors if re.search(r"\.(lokr|hada)_", key)]
    if kinds:
        raise LoraFormatError(
            lora.path,
            f"its {len(kinds)} LyCORIS LoKr / LoHa tensors outside the denoiser's linears (e.g. {kinds[0]}) cannot"
            " be merged (diffusers' loader reads no LyCORIS weights; estlora merges them on the transformer"
            " blocks' linears only); use --other-weights ignore",
        )


def _load(pipe, lora: Lora, tensors: dict[str, torch.Tensor], name: str) -> None:
    """diffusers' loader on the file minus its routed linears (same key names, same header)."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="estlora-") as folder:
        part = Path(folder) / "other.safetensors"
        metadata = _narrowed(lora.metadata, tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(part), metadata=metadata or None)
        diffusers_log = logging.getLogger("diffusers")
        level = diffusers_log.level
        diffusers_log.setLevel(logging.CRITICAL)  # it logs the failure at length; ours is the one-line error
        try:
            pipe.load_lora_weights(str(part), adapter_name=name)
        except Exception as exc:
            raise LoraFormatError(
                lora.path,
                f"diffusers could not load its weights outside the routed linears ({_reason(exc)}); "
                "use --other-weights ignore",
            ) from None
        finally:
            diffusers_log.setLevel(level)


def _reason(exc: Exception) -> str:
    """One line: the message's first line, and the next one too where the first only introduces it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


def _narrowed(metadata: dict[str, str], other: dict) -> dict[str, str]:
    """The header, with each component's peft `target_modules` cut down to the modules `other` holds.

    diffusers builds the adapter config from this metadata, and its target list names the routed
    linears too: left as is, peft would wrap those (with empty factors) under estlora's routing.
    """
    try:
        config = json.loads(metadata.get("lora_adapter_metadata") or "null")
    except json.JSONDecodeError:
        return metadata  # diffusers will say what is wrong with it
    if not isinstance(config, dict):
        return metadata
    for key in [k for k in config if k.rpartition(".")[2] == "target_modules"]:
        prefix = key.removesuffix("target_modules")
        config[key] = sorted({module_of(k).removeprefix(prefix) for k in other if k.startswith(prefix)})
    return {**metadata, "lora_adapter_metadata": json.dumps(config)}
