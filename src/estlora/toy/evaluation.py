"""The toy scorer as `estlora eval`'s metric set: on the toy base CLIP and DINO know nothing of the
world, while the scorer says which shape and texture an image shows (checked against images labelled
by eye, tests/data/toy_generated_labelled.*).

Per image: subject shown (the scorer's shape is the subject LoRA's), style shown (its texture is the
style LoRA's), both, and the scorer's probability of each, which the scatter plots.
"""

from __future__ import annotations

from ..errors import EstloraError
from .model import PREFIX
from .scorer import HEADS, load_scorer, predict, probabilities
from .world import STYLES, SUBJECTS


def concept_of(entry, concepts: tuple[str, ...], role: str) -> str:
    """The toy shape or texture a grid entry teaches: its `toy:` LoRA's name, else its name or class word."""
    for candidate in (entry.lora.removeprefix(PREFIX), entry.name, entry.class_word):
        if candidate in concepts:
            return candidate
    raise EstloraError(
        entry.lora, f"{role} {entry.name!r} is no toy {role} (the toy scorer knows {', '.join(concepts)})"
    )


class ToyMetrics:
    """`commands.evaluation.MetricSet`'s interface (not its subclass: the toy world never imports a command)."""

    labels = {
        "subject_shown": "subject shown (toy scorer: the subject's shape)",
        "style_shown": "style shown (toy scorer: the style's texture)",
        "both_shown": "both shown",
        "subject_p": "p(subject's shape) (toy scorer)",
        "style_p": "p(style's texture) (toy scorer)",
    }
    scatter = ("style_p", "subject_p")
    headline = "both_shown"
    description = "the toy scorer (`estlora.toy.scorer`)"
    record = {"scorer": "toy"}

    def __init__(self, spec):
        self.concepts = {
            **{e.name: concept_of(e, SUBJECTS, "subject") for e in spec.subjects},
            **{e.name: concept_of(e, STYLES, "style") for e in spec.styles},
        }
        self.scorer = load_scorer()

    def score(self, images, prompts, subject, style):
        shape, texture = self.concepts[subject.name], self.concepts[style.name]
        labels = predict(self.scorer, images)
        p = probabilities(self.scorer, images)
        subject_shown = [float(label.shape == shape) for label in labels]
        style_shown = [float(label.texture == texture) for label in labels]
        return {
            "subject_shown": subject_shown,
            "style_shown": style_shown,
            "both_shown": [a * b for a, b in zip(subject_shown, style_shown, strict=True)],
            "subject_p": p["shape"][:, HEADS["shape"].index(shape)].double().tolist(),
            "style_p": p["texture"][:, HEADS["texture"].index(texture)].double().tolist(),
        }
