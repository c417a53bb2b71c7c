"""The embedded default data set: a synthetic city of four styles in the exact DrivenData layout.

`generate(out_dir, ...)` writes the set (skipped when a complete one with the same parameters is
there), `ensure_default(dir)` the same unless another data set is there; `render_oblique(height, albedo, scale, angle)` is the physically consistent oblique
renderer behind it, public so augmentation tests can render a scene from any viewing direction.
`generate_named(name, dir)` writes one set of the named family (`FAMILY`, docs/DATASETS.md).
"""

from __future__ import annotations

from geopose_ray.synthetic.build import ensure_default, generate, plan
from geopose_ray.synthetic.family import FAMILY, generate_named
from geopose_ray.synthetic.render import render_oblique

__all__ = ["FAMILY", "ensure_default", "generate", "generate_named", "plan", "render_oblique"]
