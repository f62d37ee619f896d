"""The embedded shapes16 world (docs/world.md): renderer, prompt grammar, prompt encoder."""

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
