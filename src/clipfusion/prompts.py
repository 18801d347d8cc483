"""Text prompts: WinCLIP's compositional prompt ensemble for CLIP, short state prompts for diffusion.

State words and templates follow WinCLIP (Jeong et al., CVPR 2023) as re-implemented in
anomalib; their use in CLIPFusion is a reconstruction (docs/method.md).  Duplicates in the
published template list are removed.
"""
from __future__ import annotations

NORMAL_STATES = (
    "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect", "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
EXTRA_ANOMALOUS_STATES = ("broken {}",)  # APRIL-GAN's addition, off by default

TEMPLATES = (
    "a cropped photo of the {}.", "a cropped photo of a {}.",
    "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of a {}.", "a photo of the {}.",
    "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)


def class_name(category: str) -> str:
    """The object name used in prompts: the category folder name with underscores as spaces."""
    return category.replace("_", " ").strip() or "object"


def prompt_ensemble(category: str, states: tuple[str, ...], templates: tuple[str, ...] = TEMPLATES) -> list[str]:
    """Every template filled with every state phrase of ``category``."""
    name = class_name(category)
    return [template.format(state.format(name)) for state in states for template in templates]


def state_ensembles(category: str, broken: bool = False) -> tuple[list[str], list[str]]:
    """(normal prompts, anomalous prompts) for CLIP's text prototypes."""
    anomalous = ANOMALOUS_STATES + (EXTRA_ANOMALOUS_STATES if broken else ())
    return prompt_ensemble(category, NORMAL_STATES), prompt_ensemble(category, anomalous)
