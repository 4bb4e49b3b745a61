"""deris_jax.data.order: the official training sampler and the evaluation order (numpy only)."""
import numpy as np
import pytest

from deris_jax.data import order


def test_aspect_flags_are_width_over_height_above_one():
  np.testing.assert_array_equal(order.aspect_flags([480, 640, 100], [640, 480, 100]), [1, 0, 0])


def test_group_sampler_pads_each_group_and_keeps_gpu_batches_homogeneous():
  flags = np.asarray([0, 1, 0, 0, 1, 0, 0, 1])  # group 0: 5 rows, group 1: 3 rows
  rows = order.train_order(flags, global_batch=4, seed=3, epoch=0, world_size=2)
  # Each group is padded to a multiple of 4 (= 2 per GPU x 2 GPUs): 5 -> 8, 3 -> 4.
  assert rows.shape == (3, 4)
  assert order.steps_per_epoch(flags, global_batch=4, world_size=2) == 3
  counts = np.bincount(rows.reshape(-1), minlength=8)
  assert (counts >= 1).all()  # every entry is visited
  assert counts[flags == 0].sum() == 8 and counts[flags == 1].sum() == 4
  assert counts.max() == 2  # padding repeats entries of the same group, at most once here
  for batch in rows:
    for gpu in batch.reshape(2, 2):  # one official GPU batch = 2 consecutive rows
      assert flags[gpu[0]] == flags[gpu[1]]
  # A group smaller than the padding repeats its whole permutation.
  tiny = order.train_order(np.asarray([0, 1]), global_batch=4, seed=0, epoch=0, world_size=1)
  assert sorted(np.bincount(tiny.reshape(-1)).tolist()) == [4, 4]


def test_sampler_is_a_function_of_seed_and_epoch():
  flags = np.zeros(100, np.int64)
  a = order.train_order(flags, global_batch=10, seed=1, epoch=2)
  np.testing.assert_array_equal(a, order.train_order(flags, global_batch=10, seed=1, epoch=2))
  assert not np.array_equal(a, order.train_order(flags, global_batch=10, seed=1, epoch=3))
  assert not np.array_equal(a, order.train_order(flags, global_batch=10, seed=2, epoch=2))
  np.testing.assert_array_equal(np.sort(a.reshape(-1)), np.arange(100))  # a permutation


def test_sampler_draws_a_full_permutation_each_epoch():
  """Not a buffer shuffle: where an entry lands is uniform over the epoch."""
  flags = np.zeros(40, np.int64)
  first_batch = np.zeros(40)
  for epoch in range(2000):
    rows = order.train_order(flags, global_batch=4, seed=0, epoch=epoch)
    first_batch[rows[0]] += 1
  # Each entry is in the first batch with probability 4/40: 200 +- 4 sigma (13.4).
  assert np.abs(first_batch - 200).max() < 54


def test_eval_order_is_the_file_order_padded():
  rows = order.eval_order(7, 3)
  np.testing.assert_array_equal(rows, [[0, 1, 2], [3, 4, 5], [6, -1, -1]])
  np.testing.assert_array_equal(order.eval_order(0, 2), [[-1, -1]])


def test_host_rows_and_errors():
  np.testing.assert_array_equal(order.host_rows(8, 1, 4), [2, 3])
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    order.host_rows(8, 0, 3)
  with pytest.raises(ValueError, match="multiple of data.official_world_size 4"):
    order.train_order(np.zeros(8), global_batch=6, seed=0, epoch=0, world_size=4)
  with pytest.raises(ValueError, match="training split is empty"):
    order.train_order(np.zeros(0), global_batch=2, seed=0, epoch=0)
