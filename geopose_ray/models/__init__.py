"""Geopose models: smp/timm encoder + decoder composed with AGL, MAG, scale and direction heads."""

from geopose_ray.models.build import GeoposeModel, build_model

__all__ = ["GeoposeModel", "build_model"]
