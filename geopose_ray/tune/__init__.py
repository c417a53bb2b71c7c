"""The Ray layer of training: search spaces (`space`), the search (`search`, `refit`, `report`),
Ray Train (`trainer`: the one TorchTrainer factory) and Ray Tune (`tuner`). Of these, only
`trainer.py` and `tuner.py` import `ray` (with `ray_env.py` and `ensemble/job.py`, the only four).

Nothing is imported here, so that importing a submodule stays cheap.
"""
