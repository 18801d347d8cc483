"""Text prompts: WinCLIP's compositional prompt ensemble for CLIP, short state prompts for diffusion.

State words follow WinCLIP (Jeong et al., CVPR 2023) as re-implemented in anomalib.  The 22
templates are anomalib's WinCLIP list with its duplicate ("a jpeg corrupted photo of the {}."
twice) removed and the a/the pairs completed: "a cropped photo of a {}." and "a jpeg corrupted photo
of a {}." are not in anomalib's list (they are in CLIP's ImageNet templates and in other public
CLIP anomaly-detection code).  Their use in CLIPFusion is a reconstruction (docs/method.md).
Object names come from ``PromptConfig.name_of`` (category names, with overrides such as VisA's pcb1).
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


def prompt_ensemble(name: str, states: tuple[str, ...], templates: tuple[str, ...] = TEMPLATES) -> list[str]:
    """Every template filled with every state phrase of the object ``name``."""
    return [template.format(state.format(name)) for state in states for template in templates]


def state_ensembles(name: str, broken: bool = False) -> tuple[list[str], list[str]]:
    """(normal prompts, anomalous prompts) of the object ``name`` for CLIP's text prototypes."""
    anomalous = ANOMALOUS_STATES + (EXTRA_ANOMALOUS_STATES if broken else ())
    return prompt_ensemble(name, NORMAL_STATES), prompt_ensemble(name, anomalous)
