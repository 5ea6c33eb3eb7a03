"""Showing a plan to a person: a per-block text summary and a heatmap (projections x steps)."""

from __future__ import annotations

import os
import statistics
from collections import Counter

import torch

from ..families import ModelFamily
from ..plan import Plan

COLOURS = {
    "subject": (230, 126, 34),
    "style": (52, 152, 219),
    "both": (142, 68, 173),
    "none": (225, 225, 225),
}


def choices(plan: Plan) -> torch.Tensor:
    """(steps, L) codes: 0 none, 1 subject, 2 style, 3 both."""
    active = plan.weights != 0
    return active[..., 0].to(torch.int8) + 2 * active[..., 1].to(torch.int8)


CODE_NAMES = ("none", "subject", "style", "both")


def blocks(plan: Plan, family: ModelFamily) -> list[tuple[str, list[int]]]:
    """Blocks in the model's order with the indices of their projections."""
    grouped: dict[str, list[int]] = {}
    for i, name in enumerate(plan.layers):
        grouped.setdefault(family.block_of(name), []).append(i)
    return list(grouped.items())


def headline(plan: Plan) -> str:
    cfg = plan.config
    parts = [f"method {cfg.method}", f"{plan.steps} steps", f"route {cfg.route}"]
    if cfg.gated:
        source = {"default": "default, not measured", "given": "given", "measured": "measured"}[plan.beta_source]
        parts += [
            f"alpha {cfg.alpha:g}",
            f"beta {plan.beta:.4g} ({source})",
            f"gamma {plan.gamma:.4g} ({cfg.gamma_rule})",
            f"pattern {cfg.time_pattern}",
        ]
    if cfg.method == "switch":
        parts.append(f"switch every {cfg.switch_every}")
    if cfg.separate_passes:
        parts.append("each LoRA in its own denoiser pass, predictions averaged")
    parts.append(f"strengths {cfg.subject_scale:g}/{cfg.style_scale:g}")
    parts.append(f"other weights {cfg.other_weights}")
    return ", ".join(parts)


def summary(plan: Plan, family: ModelFamily) -> str:
    """What a user reads: how many projections stay with one LoRA, how many flip, and when, per block."""
    codes = choices(plan)
    flips = plan.flip_steps()

    changes = (codes[1:] != codes[:-1]).sum(dim=0)

    def kind(i: int) -> str:
        column = codes[:, i]
        if flips[i] is None:
            return f"{CODE_NAMES[int(column[0])]} throughout"
        if changes[i] > 1:
            return f"alternating ({int(changes[i])} changes)"
        return f"{CODE_NAMES[int(column[0])]} -> {CODE_NAMES[int(column[-1])]}"

    overall = Counter(kind(i) for i in range(len(plan.layers)))
    lines = [
        headline(plan),
        f"{len(plan.layers)} projections: "
        + ", ".join(f"{n} {k}" for k, n in sorted(overall.items(), key=lambda kv: -kv[1])),
    ]
    lines += [
        f"gated as one unit (a fused update that does not split): {', '.join(members)}" for members in plan.units
    ]
    header = f"{'block':28} {'proj':>4} {'subject@0':>9} {'style@end':>9} {'flip':>5}  first/median/last flip step"
    lines += ["", header]
    for block, indices in blocks(plan, family):
        first_subject = sum(int(codes[0, i]) & 1 for i in indices)
        last_style = sum(int(codes[-1, i]) >> 1 for i in indices)
        flipped = [flips[i] for i in indices if flips[i] is not None]
        when = f"{min(flipped)}/{statistics.median(flipped):g}/{max(flipped)}" if flipped else "-"
        lines.append(f"{block:28} {len(indices):>4} {first_subject:>9} {last_style:>9} {len(flipped):>5}  {when}")
    share = codes.eq(1).float().mean(dim=1)
    lines += [
        "",
        "share of projections on the subject LoRA, by step: "
        + " ".join(f"{int(round(100 * float(s)))}" for s in share)
        + " (%)",
    ]
    return "\n".join(lines)


def _wrapped(text: str, font, width: int) -> list[str]:
    """`text` broken at its commas into lines no wider than `width` pixels (a long headline would
    otherwise make the image wide and, scaled to fit a page, illegible)."""
    lines = [""]
    for part in text.split(", "):
        candidate = f"{lines[-1]}, {part}" if lines[-1] else part
        if lines[-1] and font.getlength(candidate) > width:
            lines[-1] += ","
            lines.append(part)
        else:
            lines[-1] = candidate
    return lines


def heatmap(plan: Plan, family: ModelFamily, path: str | os.PathLike) -> None:
    """Draw the plan: one row per projection grouped by block, one column per step, colour = LoRA used."""
    from PIL import Image, ImageDraw, ImageFont

    from ..outputs import atomic_path

    codes = choices(plan)
    groups = blocks(plan, family)
    gap, label_w, bottom, line_h = 6, 250, 48, 20
    row_h = min(8, max(2, -(-18 // min(len(indices) for _, indices in groups))))  # each block's label fits its rows
    col_w = max(4, min(48, 720 // plan.steps))
    font = ImageFont.load_default(size=15)  # legible when the page shows the map at its own width
    width = max(label_w + col_w * plan.steps + 20, 640)
    title = _wrapped(headline(plan), font, width - 16)
    top = 12 + line_h * len(title) + 8
    height = top + row_h * len(plan.layers) + gap * (len(groups) - 1) + bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for number, line in enumerate(title):
        draw.text((8, 8 + line_h * number), line, fill="black", font=font)
    palette = torch.tensor([COLOURS[name] for name in CODE_NAMES], dtype=torch.uint8)

    y = top
    for block, indices in groups:
        pixels = palette[codes[:, indices].long()]  # (steps, rows, 3)
        pixels = pixels.permute(1, 0, 2).repeat_interleave(row_h, 0).repeat_interleave(col_w, 1)
        image.paste(Image.fromarray(pixels.numpy()), (label_w, y))
        label_y = y + row_h * len(indices) // 2 - 8
        draw.text((8, label_y), f"{block} ({len(indices)})", fill="black", font=font)
        y += row_h * len(indices) + gap

    for step in range(0, plan.steps, max(1, plan.steps // 10)):
        draw.text((label_w + step * col_w, y - gap + 4), str(step), fill="black", font=font)
    x = 8
    for name in ("subject", "style", "both", "none"):
        draw.rectangle((x, height - 20, x + 14, height - 6), fill=COLOURS[name])
        draw.text((x + 18, height - 22), name, fill="black", font=font)
        x += 100
    draw.text((x + 10, height - 22), "x: denoising step", fill="black", font=font)
    with atomic_path(path) as staging:
        image.save(staging, format="PNG")
