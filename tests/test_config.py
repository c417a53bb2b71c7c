"""The typed Config: values are cast to each key's type, and a cast never loses information."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geopose_ray.config import Config
from geopose_ray.device import channels_last


@pytest.mark.parametrize("value", [16, "16", 16.0, np.int64(16)])
def test_whole_numbers_become_ints(value):
    assert Config.from_dict({"batch_size": value}).data.batch_size == 16


def test_a_large_integer_seed_is_kept_exactly():
    assert Config.from_dict({"seed": 2**60 + 1}).train.seed == 2**60 + 1


@pytest.mark.parametrize("value", [2.7, "2.5", np.float32(0.5)])
def test_a_fraction_for_an_int_key_is_refused_not_truncated(value):
    with pytest.raises(ValueError, match="batch_size must be a whole number"):
        Config.from_dict({"batch_size": value})


@pytest.mark.parametrize(("value", "expected"), [(True, True), ("yes", True), ("off", False), (0, False)])
def test_booleans(value, expected):
    assert Config.from_dict({"channels_last": value}).train.channels_last is expected


def test_a_word_that_is_not_a_boolean_is_refused():
    with pytest.raises(ValueError, match="channels_last must be true or false or auto"):
        Config.from_dict({"channels_last": "maybe"})


@pytest.mark.parametrize(("value", "cuda", "cpu"), [(None, True, False), ("auto", True, False), ("on", True, True), (False, False, False)])
def test_channels_last_left_unset_is_on_for_cuda_alone(value, cuda, cpu):
    flag = Config.from_dict({} if value is None else {"channels_last": value}).train.channels_last
    assert (channels_last(flag, torch.device("cuda")), channels_last(flag, torch.device("cpu"))) == (cuda, cpu)


def test_replace_returns_a_new_config():
    cfg = Config.from_dict({"lr": 1e-3})
    other = cfg.replace(lr=2e-3)
    assert (cfg.optim.lr, other.optim.lr) == (1e-3, 2e-3)


@pytest.mark.parametrize(("value", "expected"), [(None, 16), ("4", 4), (np.int64(1), 1)])
def test_sync_every_is_a_flat_train_key(value, expected):
    flat = {} if value is None else {"sync_every": value}
    assert Config.from_dict(flat).train.sync_every == expected


@pytest.mark.parametrize("value", [0, -3])
def test_sync_every_below_one_is_refused(value):
    with pytest.raises(ValueError, match="sync_every must be >= 1"):
        Config.from_dict({"sync_every": value})
