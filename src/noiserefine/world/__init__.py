"""The embedded shapes16 world (DESIGN.md section 3): renderer, prompt grammar, prompt encoder."""

from noiserefine.world.shapes16 import (
    ALL_PROMPTS,
    COLORS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    Prompt,
    parse_prompt,
    render,
)

__all__ = ["ALL_PROMPTS", "COLORS", "IMAGE_SIZE", "POSITIONS", "SHAPES", "Prompt", "parse_prompt", "render"]
