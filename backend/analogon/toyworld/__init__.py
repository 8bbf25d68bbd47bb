"""The toy world: a synthetic image world with known ground truth, and the model trained on it.

- :mod:`.world`   scenes, deterministic renderer, captions, one-attribute changes
- :mod:`.reader`  attribute reader (plain image analysis, no learning)
- :mod:`.vocab`   the word-level vocabulary as a ``CLIPTokenizer``
- :mod:`.models`  the sizes of toy-sd's components
- :mod:`.train`   ``analogon train-toy``
- :mod:`.evaluate` toy-sd's generation and img2img accuracy on held-out prompts
"""
from .world import (ATTRIBUTES, BACKGROUNDS, COLOURS, HELD_OUT_PAIRS, SHAPES, SIZES, TEXTURES,
                    caption, change, is_held_out, make_scene, random_scene, render)
from .reader import read

__all__ = ["ATTRIBUTES", "BACKGROUNDS", "COLOURS", "HELD_OUT_PAIRS", "SHAPES", "SIZES",
           "TEXTURES", "caption", "change", "is_held_out", "make_scene", "random_scene",
           "render", "read"]
