"""geopose_ray: Ray Tune + Optuna search and ensembling for monocular geocentric pose.

Nothing is imported here on purpose: importing the package must stay cheap and free of side
effects, because Ray imports it in every worker process.
"""

__version__ = "0.1.0"
