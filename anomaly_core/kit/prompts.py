"""The normal / abnormal prompt ensemble shared by zero-shot CLIP and AA-CLIP.

Each prompt is a template filled with a state phrase, the state phrase filled with the class name:
6 normal states x 7 templates = 42 normal prompts, 10 abnormal states x 7 templates = 70 abnormal prompts.
"""
from __future__ import annotations

__all__ = ["NORMAL_STATES", "ABNORMAL_STATES", "TEMPLATES", "build_prompts", "class_phrase"]

NORMAL_STATES = [
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
]

ABNORMAL_STATES = [
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
    "defective {}",
    "flawed {}",
    "{} with a scratch",
    "{} with a crack",
    "{} with contamination",
]

TEMPLATES = [
    "a photo of a {}.",
    "a photo of the {}.",
    "a cropped photo of a {}.",
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {} for visual inspection.",
]


def class_phrase(class_name: str) -> str:
    """'metal_nut' -> 'metal nut' (underscores become spaces, surrounding blanks dropped)."""
    return " ".join(class_name.replace("_", " ").split())


def _fill(pattern: str, text: str) -> str:
    # str.replace instead of str.format: a class name containing braces must not break formatting
    return pattern.replace("{}", text)


def build_prompts(class_name: str) -> tuple[list[str], list[str]]:
    """Class name -> (normal prompts [42], abnormal prompts [70]); states outer, templates inner."""
    name = class_phrase(class_name)
    normal = [_fill(t, _fill(s, name)) for s in NORMAL_STATES for t in TEMPLATES]
    abnormal = [_fill(t, _fill(s, name)) for s in ABNORMAL_STATES for t in TEMPLATES]
    return normal, abnormal
