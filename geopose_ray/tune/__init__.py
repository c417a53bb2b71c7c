"""The Ray layer of training: search spaces, the Tune driver and the Ray Train adapter
(`worker.train_fn_per_worker`). Every `ray` import of the training path lives in this package.

Nothing is imported here, so that importing a submodule stays cheap.
"""
