"""Load one LoRA file, whatever its layout and model family, into per-linear factors keyed by module path.

Every layout found in the wild is normalised to the same thing: for each routable linear of the
denoiser (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`, ...) the down factor A
(rank x in), the up factor B (out x rank) and the scale diffusers/peft apply, so that
delta W = scale * B @ A is exactly the update a plain diffusers run would add. The family the file
was made for reads its layouts (`ModelFamily.lora_parts`); the checks on the values are the same for
every family and live here.

Only safetensors is read; pickle checkpoints are refused without being opened.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace

import torch

from ..errors import BaseModelMismatchError, LoraFormatError, LoraShapeError, LoraValueError
from ..families import CLAIM_ORDER, FAMILIES, LoraParts, ModelFamily, family_named, family_of_lora
from ..files import lycoris
from ..files.lora_keys import check_alpha, module_of, pattern_key
from ..files.safetensors import file_sha256, read_safetensors
from ..files.sources import resolve_lora_path
from ..updates import DoraFactors, Lora, LoraFactors, Update


def load_lora(
    source: str | os.PathLike,
    base_shapes: dict[str, tuple[int, int]] | None = None,
    base_name: str = "the base model",
    family: ModelFamily | None = None,
    zero_alpha: str = "rank",
) -> Lora:
    """Load and validate one LoRA. Raises a `LoraError` subclass naming the file on bad input.

    With `base_shapes` (routable linear -> (out, in), as `estlora.loading.base.describe_base` gives
    them), also checks it fits that base; with `family`, that it was made for that family.
    `zero_alpha` says how an alpha of 0 is read (`ModelConfig.zero_alpha`).
    """
    path = resolve_lora_path(source)
    tensors, metadata = read_safetensors(path)
    found = _family(path, tensors, family)
    parts = found.lora_parts(path, tensors, metadata)
    projections = _factors(path, found, parts, metadata)
    guess = found.guess_base({name: (f.out_features, f.in_features) for name, f in projections.items()})
    if guess in found.foreign_bases:
        served = " and ".join(f.label for f in FAMILIES)
        raise BaseModelMismatchError(path, f"a LoRA for {guess}, which estlora does not serve ({served})")
    notes = _read_zero_alphas(projections, parts.keys, zero_alpha)
    if not projections:
        raise found.no_projections(path, parts.other)
    for key, tensor in parts.other.items():  # not routed, but merged under --other-weights merge: broken either way
        if tensor.is_floating_point() and not torch.isfinite(_arithmetic(tensor)).all():
            raise LoraValueError(path, f"{key} holds NaN or infinite values")
    lora = Lora(
        source=str(source),
        path=path,
        layout=parts.layout,
        projections=projections,
        other=parts.other,
        sha256=file_sha256(path),
        metadata=metadata,
        family=found.name,
        projection_keys={module: parts.keys[module] for module in projections},
        notes=notes,
    )
    if base_shapes is not None:
        check_against_base(lora, base_shapes, base_name)
    return lora


def load_pair(
    subject: str | os.PathLike,
    style: str | os.PathLike,
    base_shapes: dict[str, tuple[int, int]] | None = None,
    base_name: str = "the base model",
    family: ModelFamily | None = None,
    zero_alpha: str = "rank",
) -> tuple[Lora, Lora]:
    """Subject and style LoRAs, each checked against the base (when given) and against each other."""
    pair = (
        load_lora(subject, base_shapes, base_name, family, zero_alpha),
        load_lora(style, base_shapes, base_name, family, zero_alpha),
    )
    check_pair(*pair)
    return pair


def _family(path, tensors: dict[str, torch.Tensor], family: ModelFamily | None) -> ModelFamily:
    """The family the file's keys follow; refused in one line when it is no LoRA, or not the given family's."""
    keys = list(tensors)
    found = family_of_lora(keys)
    if found is None:
        raise _not_a_lora(path, tensors)
    if family is not None and found is not family:
        raise BaseModelMismatchError(path, f"a {found.label} LoRA, but the base is {family.label}")
    return found


def _not_a_lora(path, tensors: dict[str, torch.Tensor]) -> Exception:
    if not tensors:
        return LoraFormatError(path, "safetensors file holds no tensors")
    keys = list(tensors)
    if any(re.search(r"\.(hada_|lokr_)", k) for k in keys):
        return LoraFormatError(
            path, f"holds LyCORIS LoKr / LoHa weights in a layout estlora does not know; first keys: {keys[0]}"
        )
    sample = ", ".join(keys[:2])
    if any("lora" in k.lower() for k in keys):
        return LoraFormatError(path, f"holds LoRA keys in a layout estlora does not know; first keys: {sample}")
    reason = next((r for r in (f.not_a_lora(keys) for f in CLAIM_ORDER) if r), None)
    return LoraFormatError(
        path, reason or f"holds no LoRA keys (is this a full model checkpoint?); first keys: {sample}"
    )


def _factors(path, family: ModelFamily, found: LoraParts, metadata: dict[str, str]) -> dict[str, Update]:
    """The update per module, in the family's order, after checking every part."""
    meta_alpha, alpha_pattern, rslora = metadata_alphas(path, metadata, family.lora_prefix)
    projections = {}
    parts = found.parts
    for module in family.ordered(parts):
        got = parts[module]
        file_module = module_of(next(iter(found.keys.get(module, ())), module))  # messages name the file's module
        if lycoris.kind_of(got) != "lora":
            if "dora_scale" in got:
                raise LoraFormatError(path, f"{file_module}: DoRA on a LyCORIS {lycoris.kind_of(got)} is not supported")
            projections[module] = _lycoris_update(path, file_module, got)
            continue
        if "A" not in got or "B" not in got:
            missing = "down (A)" if "A" not in got else "up (B)"
            raise LoraShapeError(path, f"{module}: {missing} factor missing")
        down, up = _as_matrix(path, module, got["A"]), _as_matrix(path, module, got["B"])
        if down.shape[0] != up.shape[1]:
            raise LoraShapeError(
                path,
                f"{module}: rank mismatch, down (A) is {tuple(down.shape)} but up (B) is {tuple(up.shape)}",
            )
        for name, tensor in (("down", down), ("up", up)):
            if not torch.isfinite(tensor).all():
                raise LoraValueError(path, f"{module}: {name} factor holds NaN or infinite values")
        rank = down.shape[0]
        if rank == 0:
            raise LoraShapeError(path, f"{module}: rank 0 (empty factors)")
        if "alpha" in got:
            alpha = float(check_alpha(path, module, got["alpha"]).float().item())
        elif pattern_key(alpha_pattern, module) is not None:
            alpha = float(alpha_pattern[pattern_key(alpha_pattern, module)])
        else:
            alpha = meta_alpha if meta_alpha is not None else float(rank)
        if not math.isfinite(alpha):
            raise LoraValueError(path, f"{module}: alpha is {alpha}")
        projections[module] = LoraFactors(down=down, up=up, alpha=alpha, rslora=rslora)
        if "magnitude" in got or "dora_scale" in got:
            projections[module] = _dora(path, file_module, projections[module], got)
    return projections


def _dora(path, module: str, factors: LoraFactors, got: dict) -> DoraFactors:
    """A LoRA with DoRA's magnitude: peft's `lora_magnitude_vector` (out,) or LyCORIS' `dora_scale`
    (out, 1), each applied as its own library applies it; LyCORIS' input-axis form (1, in) is refused."""
    peft = "magnitude" in got
    magnitude = got["magnitude" if peft else "dora_scale"]
    if not peft and magnitude.ndim == 2 and magnitude.shape[0] == 1 and factors.out_features != 1:
        raise LoraFormatError(
            path, f"{module}: DoRA with its magnitude on the input axis (LyCORIS wd_on_out=False) is not supported"
        )
    if magnitude.numel() != factors.out_features:
        raise LoraShapeError(
            path, f"{module}: DoRA magnitude has shape {tuple(magnitude.shape)}, expected {factors.out_features} rows"
        )
    magnitude = _arithmetic(magnitude).flatten()
    if not torch.isfinite(magnitude).all():
        raise LoraValueError(path, f"{module}: DoRA magnitude holds NaN or infinite values")
    fields = {name: getattr(factors, name) for name in ("down", "up", "alpha", "rslora")}
    return DoraFactors(**fields, magnitude=magnitude, convention="peft" if peft else "lycoris")


def _lycoris_update(path, module: str, got: dict) -> Update:
    """A LoKr or LoHa, at LyCORIS' scale; a fused member's rows and unit kept."""
    alpha = float(check_alpha(path, module, got["alpha"]).float().item()) if "alpha" in got else None
    if alpha is not None and not math.isfinite(alpha):
        raise LoraValueError(path, f"{module}: alpha is {alpha}")
    update = lycoris.update_of(path, module, got, alpha)
    if lycoris.ROWS in got:
        update = replace(update, rows=got[lycoris.ROWS], unit=got[lycoris.UNIT])
    return update


def _read_zero_alphas(projections: dict[str, Update], keys: dict, reading: str) -> tuple[str, ...]:
    """An alpha of 0 read as `reading` says (in place, and in the tensors diffusers' loader would get
    for `--other-weights merge`), with the note that says so."""
    zero = [module for module, factors in projections.items() if factors.alpha == 0]
    if not zero:
        return ()
    if reading == "rank":
        for module in zero:
            factors = projections[module]
            # kohya's rank; LyCORIS' dim, which its modules take for an alpha of 0 too
            full = float(factors.rank if factors.kind == "lora" else factors.dim)
            projections[module] = replace(factors, alpha=full)
            for name in keys.get(module, {}):
                if name.endswith("alpha"):
                    keys[module][name] = torch.tensor(full)
        how = "read as alpha = rank (scale 1), as kohya's trainer did; --zero-alpha zero applies it as diffusers"
        how += " and ComfyUI do (scale 0: no effect)"
    else:
        how = "applied as diffusers and ComfyUI do (scale 0: no effect); --zero-alpha rank reads it as kohya's"
        how += " trainer did (alpha = rank)"
    return (f"warning: alpha is 0 in {len(zero)} of {len(projections)} projections: {how}",)


def metadata_alphas(path, metadata: dict[str, str], prefix: str) -> tuple[float | None, dict[str, float], bool]:
    """lora_alpha, alpha_pattern and use_rslora from diffusers' adapter metadata for the denoiser.

    Metadata that is not a JSON object is refused, as diffusers refuses it: read as absent, every
    alpha would fall back to the rank and the scales would be silently wrong."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}, False
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraFormatError(path, f"its lora_adapter_metadata is not valid JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(config, dict):
        raise LoraFormatError(path, f"its lora_adapter_metadata is JSON but not an object ({type(config).__name__})")
    # diffusers packs per-component configs as "unet.lora_alpha"; a bare peft config has no prefix.
    config = {k.removeprefix(f"{prefix}."): v for k, v in config.items() if not k.startswith("text_encoder")}
    alpha = config.get("lora_alpha")
    return (
        (None if alpha is None else float(alpha)),
        dict(config.get("alpha_pattern") or {}),
        bool(config.get("use_rslora")),
    )


def _as_matrix(path, module: str, tensor: torch.Tensor) -> torch.Tensor:
    # Some trainers store linear factors as 1x1 convolutions: (r, in, 1, 1).
    if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
        tensor = tensor[:, :, 0, 0]
    if tensor.ndim != 2:
        raise LoraShapeError(path, f"{module}: factor has shape {tuple(tensor.shape)}, expected a matrix")
    if not tensor.is_floating_point():
        dtype = str(tensor.dtype).removeprefix("torch.")
        raise LoraValueError(path, f"{module}: factor has dtype {dtype}, expected floats")
    return _arithmetic(tensor)


def _arithmetic(tensor: torch.Tensor) -> torch.Tensor:
    """fp8 factors as fp32 (exact): torch has no arithmetic on 8-bit floats; peft upcasts them on load too."""
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() == 1 else tensor


def check_against_base(lora: Lora, base_shapes: dict[str, tuple[int, int]], base_name: str) -> None:
    """Raise BaseModelMismatchError unless every projection exists in the base with the same widths."""
    guess = base_guess(lora)
    for module, factors in lora.projections.items():
        expected = base_shapes.get(module)
        if expected is None:
            raise BaseModelMismatchError(
                lora.path, f"made for another base model (looks like {guess}): {base_name} has no module {module}"
            )
        got = (factors.out_features, factors.in_features)
        if got != expected:
            raise BaseModelMismatchError(
                lora.path,
                f"made for another base model (looks like {guess}): {module} is {got[1]}->{got[0]} "
                f"in the LoRA but {expected[1]}->{expected[0]} in {base_name}",
            )


def base_guess(lora: Lora) -> str:
    """Which base the LoRA looks made for, from its shapes (SD 1.x, SDXL, ...), for messages and `inspect`."""
    if not lora.family:
        return "unknown"
    shapes = {name: (f.out_features, f.in_features) for name, f in lora.projections.items()}
    return family_named(lora.family).guess_base(shapes)


def check_pair(subject: Lora, style: Lora) -> None:
    """Raise BaseModelMismatchError if the two LoRAs disagree on their family or a shared projection's shape."""
    if subject.family and style.family and subject.family != style.family:
        raise BaseModelMismatchError(
            style.path, f"made for another model family ({style.family}) than the subject LoRA ({subject.family})"
        )
    for module in subject.projections.keys() & style.projections.keys():
        a, b = subject.projections[module], style.projections[module]
        if (a.out_features, a.in_features) != (b.out_features, b.in_features):
            raise BaseModelMismatchError(
                style.path,
                f"made for another base model than the subject LoRA {subject.path}: {module} is "
                f"{b.in_features}->{b.out_features} here but {a.in_features}->{a.out_features} there",
            )
