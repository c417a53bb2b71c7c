"""Synthetic city."""

from __future__ import annotations

from geopose_ray.synthetic.render import render_oblique

__all__ = ["render_oblique"]
