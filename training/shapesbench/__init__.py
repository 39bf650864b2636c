"""ShapesBench: a synthetic compositional text-image benchmark in GenEval's image.

128 x 128 pictures of coloured circles, squares and upright triangles on black, captions in four
exact prompt forms (single, two objects, counting, position), held-out compositions, and a
classical (no neural nets) judge. The specification is ``docs/shapesbench.md``.

    from training.shapesbench import ShapesDataset, render_scene, sample_scene, judge, evaluate

Names are loaded lazily so that importing the CLI module stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "spec": (
        "BACKGROUND",
        "CATEGORIES",
        "COLORS",
        "HELD_OUT",
        "IMAGE_SIZE",
        "RELATIONS",
        "SHAPES",
        "SPEC_VERSION",
        "Prompt",
        "format_prompt",
        "parse_prompt",
        "relation_holds",
    ),
    "render": ("Scene", "SceneObject", "render_scene", "sample_prompt", "sample_scene", "scene_at", "scene_for_prompt"),
    "judging": ("Detection", "JudgeResult", "detect", "judge"),
    "dataset": ("ShapesDataset",),
    "evaluation": ("evaluate", "evaluation_prompts", "sample_grid"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
