"""Model families behind one small protocol (`Backbone`), one thin adapter each."""

from noiserefine.backbones.base import Backbone, Cond, cat_cond, select_cond

__all__ = ["Backbone", "Cond", "cat_cond", "select_cond"]
