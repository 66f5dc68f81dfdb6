"""Tests for the static preconditioning plan."""

import math

import pytest

from optax_shampoo4 import partition


def _orders(plan, leaf_index):
  leaf = plan.leaves[leaf_index]
  return [(b.left.bucket.order, b.right.bucket.order) for b in leaf.blocks]


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((), None),
        ((7,), None),
        ((1, 1, 768), None),  # a ViT cls token
        ((5, 1), None),
        ((0, 4), None),  # zero-size: nothing to precondition
        ((3, 4), (3, 4)),
        ((1, 3, 1, 4), (3, 4)),
        ((64, 3, 3, 3), (64, 27)),  # conv kernel (out, in, kh, kw)
        ((3, 3, 16, 32), (144, 32)),  # flax conv kernel (kh, kw, in, out)
        ((768, 12, 64), (768, 768)),  # flax attention query kernel (d, heads, head_dim)
        ((12, 64, 768), (768, 768)),  # flax attention output kernel (heads, head_dim, d)
        ((4, 4, 4), (4, 16)),  # ties: first split
        ((50257, 768), (50257, 768)),
    ],
)
def test_matrix_shape(shape, expected):
  assert partition.matrix_shape(shape) == expected


@pytest.mark.parametrize("size, max_order", [(1, 4), (4, 4), (5, 4), (50257, 1024), (2304, 1024), (1200, 1200)])
def test_split_dim_covers_dimension_in_order(size, max_order):
  chunks = partition.split_dim(size, max_order)
  assert chunks[0][0] == 0 and chunks[-1][1] == size
  assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
  assert all(0 < stop - start <= max_order for start, stop in chunks)
  assert len(chunks) == math.ceil(size / max_order)
  assert all(stop - start == max_order for start, stop in chunks[:-1])


def test_gpt2_embedding_blocks_and_remainder():
  plan = partition.make_plan([(50257, 768)], 1024, 64, True)
  orders = _orders(plan, 0)
  assert len(orders) == 50  # 49 full row blocks and one of 50257 - 49 * 1024 = 81 rows
  assert orders[:49] == [(1024, 768)] * 49
  assert orders[49] == (81, 768)
  sizes = {key.name: n for key, n in plan.bucket_sizes}
  assert sizes == {"order81_q": 1, "order768_q": 50, "order1024_q": 49}


def test_gpt2_mlp_matrix_splits_columns():
  plan = partition.make_plan([(768, 3072)], 1024, 64, True)
  assert _orders(plan, 0) == [(768, 1024)] * 3


def test_conv_kernel_and_small_factors_stay_fp32():
  plan = partition.make_plan([(64, 3, 3, 3)], 1024, 64, True)
  (block,) = plan.leaves[0].blocks
  assert block.left.bucket == partition.BucketKey(64, True)
  assert block.right.bucket == partition.BucketKey(27, False)  # below min_quant_order


def test_fp32_format_never_quantizes():
  plan = partition.make_plan([(512, 512), (3000, 70)], 1024, 64, False)
  assert not any(key.quantized for key in plan.buckets)


def test_buckets_are_dense_indexed_and_shared_across_leaves():
  shapes = [(768, 768), (3, 768), (768,), (768, 2304), (1, 1, 8)]
  plan = partition.make_plan(shapes, 1024, 64, True)
  seen = {}
  for leaf in plan.leaves:
    for block in leaf.blocks:
      for slot in (block.left, block.right):
        seen.setdefault(slot.bucket, []).append(slot.index)
  for key, size in plan.bucket_sizes:
    assert sorted(seen[key]) == list(range(size))
  # (768,768): L768 R768; (3,768): L3 R768; (768,2304): L768 x3, R1024 x2, R256.
  assert dict(plan.bucket_sizes)[partition.BucketKey(768, True)] == 2 + 1 + 3
  assert [lp.preconditioned for lp in plan.leaves] == [True, True, False, True, False]
  assert list(plan.buckets) == sorted(plan.buckets)


def test_factor_slots_match_block_slots():
  plan = partition.make_plan([(40, 20), (20, 40)], 16, 8, True)
  for key, slots in plan.factor_slots().items():
    for index, (leaf, block, side) in enumerate(slots):
      slot = getattr(plan.leaves[leaf].blocks[block], side)
      assert slot.bucket == key and slot.index == index


def test_plan_is_deterministic_and_hashable():
  shapes = [(100, 30), (7,), (30, 100)]
  a = partition.make_plan(shapes, 64, 16, True)
  b = partition.make_plan(shapes, 64, 16, True)
  assert a == b and hash(a) == hash(b)


def test_blocks_tile_the_matrix_exactly():
  plan = partition.make_plan([(2500, 1300)], 1024, 64, True)
  leaf = plan.leaves[0]
  covered = sum((b.rows[1] - b.rows[0]) * (b.cols[1] - b.cols[0]) for b in leaf.blocks)
  assert covered == 2500 * 1300
  assert len({(b.rows, b.cols) for b in leaf.blocks}) == len(leaf.blocks) == 3 * 2
