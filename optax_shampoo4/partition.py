"""The static preconditioning plan: a pure function of the gradient shapes.

For every parameter leaf the plan says how Shampoo sees it:

* size-1 dimensions are dropped; a leaf of rank <= 1 after that (biases, norm
  scales, ``(1, 1, D)`` tokens, scalars) or with a zero-size dimension is
  passed through unpreconditioned;
* otherwise the leaf is viewed as a matrix ``(prod(dims[:k]), prod(dims[k:]))``
  with the split ``k`` that makes it closest to square (the smallest larger
  side; the first such ``k`` on ties). For PyTorch layouts this is the paper's
  ``(d0, prod(rest))`` rule (a conv kernel ``(out, in, kh, kw)`` becomes
  ``(out, in*kh*kw)``), and it also does the right thing for JAX layouts,
  where the output dimension is last: a Flax conv kernel ``(kh, kw, in, out)``
  becomes ``(kh*kw*in, out)`` and an attention kernel ``(d, heads, head_dim)``
  becomes ``(d, heads*head_dim)``, instead of a thin ``(kh, kw*in*out)``;
* each matrix dimension above ``max_order`` is cut into chunks of
  ``max_order`` plus a remainder, and every block gets its own left factor
  (order = block rows) and right factor (order = block columns).

Factors are grouped into **buckets** by ``(order, quantized)``; a bucket's
factors are stacked along a leading axis so that every refresh is one batched
operation. The plan holds only Python values and is recomputed at trace time,
so nothing static needs to live in the optimizer state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True, order=True)
class BucketKey:
  """Identifies a bucket: factors of one order and one storage kind."""

  order: int
  quantized: bool

  @property
  def name(self) -> str:
    """The bucket's key in the optimizer state, e.g. ``"order768_q"``."""
    return f"order{self.order}_{'q' if self.quantized else 'f32'}"


@dataclasses.dataclass(frozen=True)
class FactorSlot:
  """Where one factor lives: its bucket and its index along the bucket axis."""

  bucket: BucketKey
  index: int


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """One preconditioned block ``matrix[rows[0]:rows[1], cols[0]:cols[1]]``.

  ``left`` / ``right`` is None on a side that gets no factor (a matrix
  dimension above ``max_precond_dim`` in :func:`make_plan`).
  """

  rows: tuple[int, int]
  cols: tuple[int, int]
  left: FactorSlot | None
  right: FactorSlot | None


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one leaf is preconditioned; ``matrix_shape is None`` = passthrough."""

  shape: tuple[int, ...]
  matrix_shape: tuple[int, int] | None
  blocks: tuple[BlockPlan, ...]

  @property
  def preconditioned(self) -> bool:
    return self.matrix_shape is not None

  @property
  def view_shape(self) -> tuple[int, int]:
    """The shape of a preconditioned leaf's matrix view (a passthrough leaf has none, and raises ValueError)."""
    if self.matrix_shape is None:
      raise ValueError(f"a passthrough leaf of shape {self.shape} has no matrix view")
    return self.matrix_shape


@dataclasses.dataclass(frozen=True)
class Plan:
  """The plan of a whole tree: one :class:`LeafPlan` per leaf, and the buckets.

  Attributes:
    leaves: per-leaf plans, in ``jax.tree.leaves`` order.
    bucket_sizes: length of each bucket's factor axis, sorted by key; this
      includes padding factors (see ``bucket_multiple`` in :func:`make_plan`),
      which follow the real ones and are never used to precondition.
  """

  leaves: tuple[LeafPlan, ...]
  bucket_sizes: tuple[tuple[BucketKey, int], ...]

  @property
  def buckets(self) -> tuple[BucketKey, ...]:
    return tuple(key for key, _ in self.bucket_sizes)

  def factor_slots(self) -> dict[BucketKey, list[tuple[int, int, str]]]:
    """For each bucket, its factors in index order as ``(leaf, block, side)``."""
    slots: dict[BucketKey, list[tuple[int, int, str]]] = {k: [] for k in self.buckets}
    for leaf_index, leaf in enumerate(self.leaves):
      for block_index, block in enumerate(leaf.blocks):
        for side, slot in (("left", block.left), ("right", block.right)):
          if slot is None:
            continue
          slots[slot.bucket].append((leaf_index, block_index, side))
    return slots


def split_dim(size: int, max_order: int) -> tuple[tuple[int, int], ...]:
  """``[0, size)`` cut into chunks of ``max_order`` and a final remainder."""
  return tuple(
      (start, min(start + max_order, size)) for start in range(0, size, max_order)
  )


def matrix_shape(shape: Sequence[int]) -> tuple[int, int] | None:
  """The 2-D view Shampoo preconditions, or None for a passthrough leaf.

  Size-1 dimensions are dropped; the remaining ones are split into leading
  and trailing groups where the larger side is smallest.

  Example:
    >>> from optax_shampoo4.partition import matrix_shape
    >>> matrix_shape((64, 32, 3, 3)), matrix_shape((3, 3, 32, 64)), matrix_shape((1, 7))
    ((64, 288), (288, 64), None)
  """
  if any(d == 0 for d in shape):
    return None
  squeezed = [d for d in shape if d != 1]
  if len(squeezed) <= 1:
    return None
  splits = [(math.prod(squeezed[:k]), math.prod(squeezed[k:])) for k in range(1, len(squeezed))]
  return min(splits, key=max)


def vector_length(shape: Sequence[int]) -> int:
  """The length of a leaf that is a vector after dropping size-1 dimensions, else 0."""
  squeezed = [d for d in shape if d != 1]
  return squeezed[0] if len(squeezed) == 1 else 0


def make_plan(
    shapes: Sequence[Sequence[int]],
    max_order: int,
    min_quant_order: int,
    quantize: bool,
    bucket_multiple: int = 1,
    max_precond_dim: int | None = None,
    precondition_1d: bool = False,
) -> Plan:
  """Builds the plan for leaves of the given shapes.

  Args:
    shapes: one shape per leaf, in ``jax.tree.leaves`` order.
    max_order: largest factor order; bigger dimensions are split.
    min_quant_order: factors of smaller order are stored in float32.
    quantize: whether the state format quantizes factors at all.
    bucket_multiple: pad every bucket's factor axis to a multiple of this
      (the number of devices that share the factors), with unused factors.
    max_precond_dim: a matrix dimension above this gets no factor (that side
      of its blocks is ``None``: not preconditioned) and is not split; None:
      every dimension gets factors.
    precondition_1d: a leaf that is a vector after dropping size-1
      dimensions (length ``n > 1``) is viewed as an ``(n, 1)`` matrix whose
      blocks (``n`` cut by ``max_order``) get a left factor only, as
      Distributed Shampoo gives a vector one ``n x n`` factor per block;
      False passes vectors through.

  Returns:
    A :class:`Plan`.

  Example:
    >>> from optax_shampoo4 import partition
    >>> plan = partition.make_plan([(3000, 10), (5,)], 1024, 64, True)
    >>> [b.name for b in plan.buckets]
    ['order10_f32', 'order952_q', 'order1024_q']
  """
  counts: dict[BucketKey, int] = {}

  def assign(order: int) -> FactorSlot:
    key = BucketKey(order, quantize and order >= min_quant_order)
    index = counts.get(key, 0)
    counts[key] = index + 1
    return FactorSlot(key, index)

  leaves = []
  for shape in shapes:
    shape = tuple(int(d) for d in shape)
    mshape = matrix_shape(shape)
    blocks = []
    if mshape is None and precondition_1d and vector_length(shape) > 1:
      mshape = (vector_length(shape), 1)
      blocks = [BlockPlan(rows, (0, 1), assign(rows[1] - rows[0]), None)
                for rows in split_dim(mshape[0], max_order)]
    elif mshape is not None:
      skip_rows, skip_cols = (max_precond_dim is not None and d > max_precond_dim for d in mshape)
      row_ranges = ((0, mshape[0]),) if skip_rows else split_dim(mshape[0], max_order)
      col_ranges = ((0, mshape[1]),) if skip_cols else split_dim(mshape[1], max_order)
      for rows in row_ranges:
        for cols in col_ranges:
          left = None if skip_rows else assign(rows[1] - rows[0])
          right = None if skip_cols else assign(cols[1] - cols[0])
          blocks.append(BlockPlan(rows, cols, left, right))
    leaves.append(LeafPlan(shape, mshape, tuple(blocks)))
  padded = {key: -(-n // bucket_multiple) * bucket_multiple for key, n in counts.items()}
  return Plan(tuple(leaves), tuple(sorted(padded.items())))


# ----------------------------------------------------------------------------- per-step schedule


def block_cost(rows: int, cols: int) -> int:
  """Multiply-adds of ``L̂ G R̂`` for an ``rows × cols`` block: ``rows·cols·(rows + cols)``."""
  return rows * cols * (rows + cols)


@dataclasses.dataclass(frozen=True)
class BlockGroup:
  r"""The preconditioned blocks of one shape ``(m, n)``, cut into work items.

  Each block's output rows are cut into ``chunks`` chunks of ``rows`` rows (the
  last one padded past ``m``); item ``j`` is chunk ``j % chunks`` of block
  ``j // chunks``. Rows ``[r0, r0 + rows)`` of :math:`\hat L G \hat R` are
  :math:`\hat L_{r_0:r_0+rows,:} G \hat R`, so an item needs only those rows
  of the left root (of :math:`G` itself where the blocks have no left factor), and costs ``rows·n·(m + n)`` multiply-adds. Every device
  takes ``per_shard`` consecutive items; items past the real ones are padding.

  Attributes:
    shape: ``(m, n)``, the blocks' shape.
    blocks: ``(leaf index, BlockPlan)`` per block, in plan order.
    chunks: row chunks per block.
    per_shard: items per device.
  """

  shape: tuple[int, int]
  blocks: tuple[tuple[int, BlockPlan], ...]
  chunks: int
  per_shard: int

  @property
  def rows(self) -> int:
    """Output rows per item."""
    return -(-self.shape[0] // self.chunks)

  @property
  def left(self) -> BucketKey | None:
    """The bucket of the blocks' left factors, or None where that side is not preconditioned."""
    side = self.blocks[0][1].left
    return None if side is None else side.bucket

  @property
  def right(self) -> BucketKey | None:
    """The bucket of the blocks' right factors, or None where that side is not preconditioned."""
    side = self.blocks[0][1].right
    return None if side is None else side.bucket

  @property
  def item_cost(self) -> int:
    m, n = self.shape
    return self.rows * n * (m + n)

  def items(self, num_shards: int) -> list[list[tuple[int, int, int, int]]]:
    """Per device, its items as ``(block position, left slot, right slot, first row)``.

    Padding items have block position ``len(blocks)`` (a zero block) and the
    slots of the first block; a side without a factor has slot 0 (unused).
    """
    first = self.blocks[0][1]
    pad_block = (len(self.blocks), _slot(first.left), _slot(first.right), 0)
    flat = []
    for position, (_, block) in enumerate(self.blocks):
      for chunk in range(self.chunks):
        flat.append((position, _slot(block.left), _slot(block.right), chunk * self.rows))
    flat += [pad_block] * (num_shards * self.per_shard - len(flat))
    return [flat[d * self.per_shard:(d + 1) * self.per_shard] for d in range(num_shards)]


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Who preconditions what every step: the blocks in groups of one shape.

  Every device runs ``per_shard`` items of every group (SPMD: one program,
  the same shapes on every device), so its cost is
  :attr:`shard_cost`; :attr:`balance` compares it with a perfect split of
  the real work (padding items count as work).
  """

  groups: tuple[BlockGroup, ...]
  num_shards: int

  @property
  def shard_cost(self) -> int:
    """Multiply-adds of ``L̂ G R̂`` per device per step (padding included)."""
    return sum(g.per_shard * g.item_cost for g in self.groups)

  @property
  def total_cost(self) -> int:
    """Multiply-adds of ``L̂ G R̂`` of all real blocks (one device's work without a mesh)."""
    return sum(len(g.blocks) * block_cost(*g.shape) for g in self.groups)

  @property
  def balance(self) -> float:
    """Per-device cost over the mean ``total_cost / num_shards`` (1.0 = perfect)."""
    return self.shard_cost * self.num_shards / max(self.total_cost, 1)


def _slot(side: FactorSlot | None) -> int:
  return 0 if side is None else side.index


def _choose_chunks(num_blocks: int, rows: int, num_shards: int, tolerance: float) -> int:
  """The fewest row chunks per block whose per-device rows are within ``tolerance`` of ideal."""

  def per_device_rows(chunks):
    return -(-num_blocks * chunks // num_shards) * -(-rows // chunks)

  ideal = num_blocks * rows / num_shards
  candidates = range(1, min(rows, 2 * num_shards) + 1)
  for chunks in candidates:
    if per_device_rows(chunks) <= tolerance * ideal:
      return chunks
  return min(candidates, key=lambda c: (per_device_rows(c), c))


def make_schedule(plan: Plan, num_shards: int, tolerance: float = 1.05, split_rows: bool = True) -> Schedule:
  r"""Splits the every-step ``L̂ G R̂`` products of ``plan`` over ``num_shards`` devices.

  Blocks are grouped by shape; each group's blocks are cut into the fewest
  row chunks that bring its per-device share within ``tolerance`` of an even
  split (or as close as possible), so a tree with a single large block still
  divides over the devices, while a group with many blocks keeps them whole
  (larger matrix products).

  Args:
    plan: the plan of the gradient tree.
    num_shards: number of devices sharing the work (1: one device does all).
    tolerance: allowed per-group overshoot over an even split.
    split_rows: False keeps every block with a left factor whole (one
      chunk), for products that need whole left factors (CASPR's
      :math:`\hat L^2 G`, SOAP's :math:`Q_L X`).

  Returns:
    A :class:`Schedule`.

  Example:
    >>> from optax_shampoo4 import partition
    >>> plan = partition.make_plan([(256, 64), (64, 64), (64, 64)], 1024, 64, True)
    >>> schedule = partition.make_schedule(plan, 4)
    >>> [(g.shape, len(g.blocks), g.chunks, g.per_shard) for g in schedule.groups]
    [((64, 64), 2, 2, 1), ((256, 64), 1, 4, 1)]
    >>> schedule.balance
    1.0
  """
  by_shape: dict[tuple[int, int], list[tuple[int, BlockPlan]]] = {}
  for leaf_index, leaf in enumerate(plan.leaves):
    for block in leaf.blocks:
      shape = (block.rows[1] - block.rows[0], block.cols[1] - block.cols[0])
      by_shape.setdefault(shape, []).append((leaf_index, block))
  groups = []
  for shape in sorted(by_shape):
    blocks = tuple(by_shape[shape])
    # Row chunks are rows of the left factor, or of the block itself where it has none (any product).
    splittable = split_rows or blocks[0][1].left is None
    chunks = _choose_chunks(len(blocks), shape[0], num_shards, tolerance) if splittable else 1
    per_shard = -(-len(blocks) * chunks // num_shards)
    groups.append(BlockGroup(shape, blocks, chunks, per_shard))
  return Schedule(tuple(groups), num_shards)
