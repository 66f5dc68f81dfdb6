"""The factor engine shared by every optimizer of the library.

Shampoo (:mod:`optax_shampoo4.shampoo`) and SOAP (:mod:`optax_shampoo4.soap`)
keep the same kind of state: per preconditioned block ``G`` (m×n) a left factor
of order m and a right factor of order n, bucketed by order and storage kind
(:mod:`optax_shampoo4.partition`), each bucket in one of the formats of
:mod:`optax_shampoo4.factors`, optionally split over a device mesh
(:mod:`optax_shampoo4.sharding`). This module owns that shared machinery, so
that an optimizer is only its own step:

* :meth:`FactorEngine.plan` / :meth:`FactorEngine.init_buckets`: the static plan
  of a parameter tree and fresh buckets for it;
* :meth:`FactorEngine.refresh_stats`: fold every block's ``G Gᵀ`` / ``Gᵀ G``
  into its factors (the statistics update and eigenbasis refresh, PU), under
  ``shard_map`` when a mesh is given, with the per-factor failure policy;
* :meth:`FactorEngine.refresh_roots`: the inverse-root update (PIRU);
* :meth:`FactorEngine.apply_blocks`: the every-step per-block products
  (Shampoo's ``L̂ G R̂``, CASPR's combination, SOAP's rotations), split over
  the mesh by a static :class:`~optax_shampoo4.partition.Schedule` so that
  each device receives and computes only its share of the blocks, the
  results returning in the gradients' layout (replicated gradients: an
  all-gather of the results; FSDP gradients: all-to-alls both ways, never a
  whole gradient on every device);
* :meth:`FactorEngine.init_factors`, :meth:`FactorEngine.start_step` and
  :func:`~optax_shampoo4.step_parts.failure_counts`: the parts every optimizer's ``init`` / ``update``
  shares (the ``optax.tree.map_params`` placeholder, the step prologue, the
  failure counters of the state);
* :func:`map_blocks`: apply a per-block function to a parameter's matrix view
  and reassemble it.

The products themselves (every block's Gram matrices, one device's share of
the every-step products) are in :mod:`optax_shampoo4.block_products`; the
moves of blocks between devices in :mod:`optax_shampoo4.block_moves`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec

from optax_shampoo4 import block_moves, block_products, optax_compat, partition, sharding, validation
from optax_shampoo4 import factors as fct
from optax_shampoo4.owned_grams import owned_blocks, owned_gram_tables, owned_grams
from optax_shampoo4.step_parts import Step, all_finite, failure_counts, matrix_views, no_refresh  # noqa: F401

Buckets = dict[str, fct.Bucket]


@dataclasses.dataclass(frozen=True)
class FactorEngine:
  """Plans, stores and refreshes the Kronecker factors of a parameter tree.

  Attributes:
    config: the factor format and its numerics (:class:`~optax_shampoo4.factor_state.FactorConfig`).
    max_order: largest factor order; larger dimensions are split into blocks.
    min_quant_order: factors of smaller order are stored in float32.
    mesh: optional device mesh; each bucket's factor axis is padded to a
      multiple of ``mesh.shape[mesh_axis]`` and refreshed under ``shard_map``.
    mesh_axis: the mesh axis the factors are split over.
    max_precond_dim: matrix dimensions above this get no factor (that side of
      their blocks is not preconditioned); None: all get factors.
    precondition_1d: vectors get one left factor per block (see
      :func:`~optax_shampoo4.partition.make_plan`); False passes them through.
  """

  config: fct.FactorConfig
  max_order: int
  min_quant_order: int
  mesh: jax.sharding.Mesh | None = None
  mesh_axis: str = "data"
  max_precond_dim: int | None = None
  precondition_1d: bool = False

  @property
  def num_shards(self) -> int:
    return sharding.validate_mesh(self.mesh, self.mesh_axis)

  def plan(self, tree: Any) -> partition.Plan:
    """The static plan of a tree of arrays (or shape-carrying leaves)."""
    shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(tree)]
    return partition.make_plan(shapes, self.max_order, self.min_quant_order,
                               self.config.state_format != "fp32",
                               bucket_multiple=self.num_shards, max_precond_dim=self.max_precond_dim,
                               precondition_1d=self.precondition_1d)

  def init_buckets(self, plan: partition.Plan, epsilon: jax.Array, with_root: bool = True) -> Buckets:
    r"""Fresh buckets (statistic :math:`\epsilon I`, root :math:`I`).

    With ``with_root=False`` the buckets keep no inverse root (``root=None``):
    for optimizers that use the eigenbasis itself (SOAP).
    """
    buckets = {}
    for key, size in plan.bucket_sizes:
      bucket = fct.init_bucket(self.config, key.order, size, key.quantized, epsilon)
      buckets[key.name] = bucket if with_root else bucket._replace(root=None)
    return buckets

  def init_factors(self, params: Any, epsilon: Any, owner: str, with_root: bool = True) -> Any:
    r"""Fresh buckets for ``params`` (:meth:`init_buckets` of their plan), after checking their dtypes.

    ``optax.tree.map_params`` calls ``init`` on a placeholder that hides the
    parameter shapes; the buckets are then one opaque non-parameter leaf,
    :data:`~optax_shampoo4.optax_compat.NON_PARAMS`.

    Args:
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
      epsilon: the initial statistic is :math:`\epsilon I`.
      owner: the transformation's name, for error messages.
      with_root: keep an inverse root per factor (see :meth:`init_buckets`).
    """
    if optax_compat.is_params_placeholder(params):
      return optax_compat.NON_PARAMS
    validation.check_param_dtypes(params, owner)
    return self.init_buckets(self.plan(params), epsilon, with_root=with_root)

  def start_step(self, updates: Any, count: jax.Array, buckets: Any) -> Step:
    """The prologue of every step: flatten, plan, count, matrix views, finiteness.

    ``buckets`` (the state's) are checked against the plan of ``updates``
    (:func:`check_buckets_match`).
    """
    leaves, treedef = jax.tree.flatten(updates)
    plan = self.plan(updates)
    check_buckets_match(plan, buckets)
    return Step(leaves, treedef, plan, jnp.asarray(optax.safe_increment(count)), matrix_views(leaves, plan),
                all_finite(leaves))

  def refresh_stats(self, buckets: Buckets, plan: partition.Plan, matrices: list, beta: jax.Array,
                    row_orders: dict[str, jax.Array] | None = None
                    ) -> tuple[Buckets, jax.Array, dict[str, jax.Array]]:
    """PU for every bucket: folds each block's Gram matrices into its factors.

    Args:
      buckets: the current buckets.
      plan: the plan the buckets were built from.
      matrices: per leaf, its float32 matrix view (None for passthrough leaves).
      beta: EMA decay of the statistics.
      row_orders: optional ``{bucket name: int[k, n]}``, ``"eigen"`` buckets
        only: each factor's eigenpairs are reordered before its refresh (see
        :func:`~optax_shampoo4.factors.update_stats`).

    Returns:
      ``(new buckets, number of factor refreshes rejected as non-finite,
      {bucket name: bool[k]} accepted per factor)``.
    """
    new, failures, accepted, _ = self._fold_all(buckets, plan, matrices, beta, row_orders, fct.update_stats)
    return new, failures, accepted

  def refresh_eigen_stats(self, buckets: Buckets, plan: partition.Plan, matrices: list, beta: jax.Array,
                          row_orders: dict[str, jax.Array] | None = None
                          ) -> tuple[Buckets, jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """:meth:`refresh_stats` of ``"eigen"`` buckets, also returning each refreshed basis before it is stored.

    Returns:
      ``(new buckets, rejected count, accepted per factor, {bucket name:
      f32[k, n, n]})``: the last the new eigenvectors as rows in float32,
      before quantization (:func:`~optax_shampoo4.factors.update_eigen_stats`),
      gathered from the mesh.
    """
    new, failures, accepted, rows = self._fold_all(buckets, plan, matrices, beta, row_orders,
                                                   fct.update_eigen_stats)
    return new, failures, accepted, self.gathered(rows)

  def _fold_all(self, buckets: Buckets, plan: partition.Plan, matrices: list, beta: jax.Array,
                row_orders: dict[str, jax.Array] | None, bucket_update: Callable) -> tuple:
    """Every bucket folded by ``bucket_update`` (``update_stats``' signature; a third result collected)."""
    fold = self._stats_folder(plan, matrices, bucket_update)
    new, accepted, extra, failures = {}, {}, {}, jnp.zeros([], jnp.int32)
    real = _real_counts(plan)
    for key in plan.buckets:
      order = None if row_orders is None else row_orders[key.name]
      name = key.name
      new[name], accepted[name], *rest = fold(key, after_previous(buckets[name], new), order, beta)
      if rest:
        extra[name] = rest[0]
      failures += jnp.sum(~accepted[name][:real[name]], dtype=jnp.int32)  # padding factors do not count
    return new, failures, accepted, extra

  def _stats_folder(self, plan: partition.Plan, matrices: list,
                    bucket_update: Callable = fct.update_stats) -> Callable:
    """``fold(key, bucket, row_order, beta) -> bucket_update's results``: one bucket's statistics update.

    Without a mesh the Gram matrices of every block are formed once
    (:func:`gram_matrices`). With one, each device receives only the blocks
    of the factors it owns, split over the mesh axis from the gradients'
    own layout (:func:`~optax_shampoo4.owned_grams.owned_blocks`: with FSDP
    gradients an all-to-all, not an all-gather), and forms their Gram
    matrices inside the refresh's ``shard_map``.
    """
    if self.mesh is None:
      grams = block_products.gram_matrices(plan, matrices)
      return lambda key, bucket, order, beta: bucket_update(self.config, bucket, grams[key], beta,
                                                            row_order=order)
    tables = owned_gram_tables(plan, self.num_shards)
    axis = self.mesh_axis
    layout = block_moves.BlockLayout(self.mesh, axis, plan)

    def fold(key, bucket, order, beta):
      def on_each_device(bucket, order, blocks, beta):
        own = owned_grams(tables[key.name], blocks, lax.axis_index(axis))
        return bucket_update(self.config, bucket, own, beta, row_order=order)

      update = sharding.shard_over_factors(on_each_device, self.mesh, axis, 3, 1)
      blocks = sharding.laid_out_by_xla(
          lambda m: owned_blocks(tables[key.name], layout.aligned_views(m), self.num_shards, layout.for_blocks),
          self.mesh, PartitionSpec(axis), matrices)
      return update(bucket, order, blocks, beta)

    return fold

  def refresh_roots(self, buckets: Buckets, epsilon: jax.Array,
                    plan: partition.Plan | None = None) -> tuple[Buckets, jax.Array]:
    """PIRU for every bucket; returns ``(new buckets, rejected root count)``.

    With ``plan``, rejected padding factors (past the real ones) are not counted.
    """
    update = sharding.shard_over_factors(
        lambda bucket, epsilon: fct.update_root(self.config, bucket, epsilon),
        self.mesh, self.mesh_axis, 1, 1)
    new, failures = {}, jnp.zeros([], jnp.int32)
    real = _real_counts(plan) if plan is not None else {}
    for name, bucket in buckets.items():
      new[name], accepted = update(after_previous(bucket, new), epsilon)
      failures += jnp.sum(~accepted[:real.get(name)], dtype=jnp.int32)
    return new, failures

  def roots_from_eigenbases(self, buckets: Buckets, epsilon: jax.Array, precision: str = "highest",
                            factored: bool = False) -> dict[str, jax.Array]:
    """Dense float32 inverse roots (or with ``factored`` their factors ``W``, root ``W Wᵀ``) formed now.

    For buckets that keep no root (``store_root=False``): each device forms
    the roots of its share of the factors (:func:`~optax_shampoo4.factors.root_from_eigenbasis`),
    then they are gathered for :meth:`apply_blocks`. ``precision``: of the
    product forming each root (:func:`~optax_shampoo4.linalg.step_matmul`).
    """
    form = sharding.shard_over_factors(
        lambda bucket, epsilon: fct.root_from_eigenbasis(self.config, bucket, epsilon, precision, factored),
        self.mesh, self.mesh_axis, 1, 1)
    return {name: self.gathered(form(bucket, epsilon)) for name, bucket in buckets.items()}

  def schedule(self, plan: partition.Plan, split_rows: bool = True) -> partition.Schedule:
    """The static split of the every-step block products over the mesh."""
    return partition.make_schedule(plan, self.num_shards, split_rows=split_rows)

  def apply_blocks(self, plan: partition.Plan, matrices: list, stored: dict[str, fct.StoredMatrix],
                   fn: Callable[[Any, jax.Array, Any], jax.Array], split_rows: bool = True,
                   load: Callable[[Any], Any] | None = None) -> list:
    r"""``fn(left rows, block, right)`` for every block, each device on its share.

    For a block ``G`` (m×n) with left factor ``A`` (m×m) and right factor
    ``B`` (n×n), taken from ``stored`` (e.g. the roots), ``fn(A[r0:r1], G, B)``
    must return rows ``r0:r1`` of the block's result (m×n overall), as
    :math:`\hat L G \hat R` does; a side without a factor (SOAP's
    ``max_precond_dim``) is passed as None. Without a mesh ``fn`` gets whole
    factors, block by block (``r0, r1 = 0, m``). With a mesh the blocks follow
    :meth:`schedule`: blocks of one shape are stacked, cut into row chunks
    where that balances the work (never with ``split_rows=False``, for an
    ``fn`` that needs whole left factors). Each item's block is moved to the
    device that computes it from wherever the gradient lives
    (:func:`~optax_shampoo4.block_moves.item_blocks` split over the mesh axis: a local slice of
    replicated gradients, an all-to-all of FSDP ones); each device takes its
    items' factors from ``stored`` (which should be replicated and may be
    quantized), dequantizes only those rows, runs ``fn`` batched over its
    items under ``jax.shard_map``, and the results are put back together in
    the layout of ``matrices`` (:func:`~optax_shampoo4.block_moves.reassemble`; XLA moves them: an
    all-gather for replicated gradients, all-to-alls for split ones). Every
    device thus does ``1/N`` of the products (within
    :attr:`~optax_shampoo4.partition.Schedule.balance`) and receives only
    the blocks of its own items.

    Args:
      plan: the plan of the tree.
      matrices: per leaf, its float32 matrix view (None for passthrough leaves).
      stored: ``{bucket name: stacked [k, order, order] matrices}``, quantized or not.
      fn: the per-block function on float32 arrays.
      split_rows: whether ``fn`` may get rows of the left factor (else whole ones).
      load: decodes a stack of ``stored`` matrices whole into the float32
        factors ``fn`` gets (e.g. SOAP's bases, dequantized and rectified);
        on a mesh each device decodes only its items' factors. None:
        :func:`~optax_shampoo4.factors.load`, row by row on a mesh.

    Returns:
      Per leaf, the float32 result in the matrix view's shape (None for passthrough leaves).
    """
    if self.mesh is None:
      factors = {name: (load or fct.load)(matrix) for name, matrix in stored.items()}

      def whole(block, b):
        return fn(_factor(factors, b.left), block, _factor(factors, b.right))

      return [map_blocks(matrix, lp, whole) if lp.preconditioned else None
              for matrix, lp in zip(matrices, plan.leaves)]
    schedule = self.schedule(plan, split_rows)
    layout = block_moves.BlockLayout(self.mesh, self.mesh_axis, plan)

    def to_items(matrices):
      views = layout.aligned_views(matrices)
      return [block_moves.item_blocks(group, views, self.num_shards, layout.for_blocks(group.shape))
              for group in schedule.groups]

    items = sharding.laid_out_by_xla(to_items, self.mesh, PartitionSpec(self.mesh_axis), matrices)
    results = self._apply_on_mesh(schedule, stored, items, fn, load)
    return sharding.laid_out_by_xla(lambda results: block_moves.reassemble(schedule, plan, results, layout), self.mesh,
                                    [sharding.spec_of(m) for m in matrices], results)

  def _apply_on_mesh(self, schedule: partition.Schedule, stored: dict, items: list[jax.Array],
                     fn: Callable, load: Callable | None = None) -> list[jax.Array]:
    """Per group of ``schedule``, ``fn`` of its items, ``[num_shards · per_shard, rows, n]``, split over the mesh.

    ``items``: per group, the block of every item (:func:`~optax_shampoo4.block_moves.item_blocks`); each
    device computes its own items, and the results stay split.
    """
    axis, num_shards = self.mesh_axis, self.num_shards

    def on_each_device(items, stored):
      shard = lax.axis_index(axis)
      return [block_products.group_products(group, jnp.asarray(group.items(num_shards), jnp.int32)[shard], stored,
                                            local, fn, load)
              for group, local in zip(schedule.groups, items)]

    return sharding.shard_over_factors(on_each_device, self.mesh, axis, 1, 1)(items, stored)

  def ordered_after(self, tree: Any, done: Any) -> Any:
    """``tree`` unchanged, but on a mesh its consumers run only after ``done`` is computed.

    For the collectives of a step and its refreshes. A refresh is a
    ``lax.cond`` whose taken branch holds collectives (the gradient blocks
    moved to the devices that own their factors, the failure counts summed).
    XLA:CPU may run that conditional concurrently with the step's collectives
    that neither feed it nor depend on it, so devices can reach them in
    different orders; its thread pool has one thread per CPU device where
    there are more devices than cores, and then every thread waits in a
    different collective: a deadlock, which XLA aborts after 40 s (measured:
    8 CPU devices on 2 cores, 5 of 20 three-step runs of ``distributed_shampoo4``
    on three leaves). So on a mesh each collective of a step is an input of a
    refresh or comes after it: the refresh's operands are taken after the
    work before it, the work after it takes its inputs after its results
    (checked on the compiled program by ``tests/integration/test_collective_order.py``).
    Identity without a mesh (:func:`after_all`).
    """
    return tree if self.mesh is None else after_all(tree, done)

  def keep_split(self, buckets: Buckets) -> Buckets:
    """Keeps the returned buckets split over the mesh (identity without one)."""
    return sharding.split_factors(buckets, self.mesh, self.mesh_axis)

  def gathered(self, tree: Any) -> Any:
    """``tree`` replicated on every device, e.g. roots still quantized (identity without a mesh)."""
    return sharding.replicate(tree, self.mesh)


def check_buckets_match(plan: partition.Plan, buckets: Any) -> None:
  """Raises ValueError unless ``buckets`` hold the factors ``plan`` asks for (names and sizes).

  A gradient tree whose leaf shapes differ from the parameters the state was
  initialised with gives another plan; this names it before any product.
  A state of ``optax.tree.map_params``' placeholder is not checked.
  """
  if not isinstance(buckets, dict):
    return
  want = {key.name: size for key, size in plan.bucket_sizes}
  have = {name: jax.tree.leaves(bucket)[0].shape[0] for name, bucket in buckets.items()}
  if want != have:
    raise ValueError(
        "updates do not match the optimizer state: their shapes need the factor buckets "
        f"{want} (name: number of factors), the state holds {have}; was the state initialised with "
        "parameters of other shapes?")


def _real_counts(plan: partition.Plan) -> dict[str, int]:
  """``{bucket name: number of real (non-padding) factors}``."""
  return {key.name: len(slots) for key, slots in plan.factor_slots().items()}


def _factor(factors: dict[str, Any], side: partition.FactorSlot | None) -> Any:
  """The factor of one side of a block (None for a side without one); a bucket's factors may be a pytree of stacks."""
  return None if side is None else jax.tree.map(lambda stack: stack[side.index], factors[side.bucket.name])


def map_blocks(matrix: jax.Array, leaf_plan: partition.LeafPlan,
               fn: Callable[[jax.Array, partition.BlockPlan], jax.Array]) -> jax.Array:
  """``fn(block, block_plan)`` on every block of a leaf's matrix view, reassembled.

  ``fn`` must return an array of the block's shape.
  """
  return block_moves.join_blocks(leaf_plan, lambda b: fn(matrix[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]], b))


def after_previous(inputs: Any, done: Buckets) -> Any:
  """``inputs`` unchanged, but scheduled after the last bucket refreshed in ``done``.

  A refresh is a sequence of per-bucket programs with no data dependence
  between them, and XLA:CPU's scheduler starts them all together: the step's
  scratch is then the *sum* of every bucket's refresh temporaries (several
  ``[k, n, n]`` float32 arrays each), not their maximum. XLA allocates that
  scratch at every call, untaken ``lax.cond`` branches included, and above
  glibc's mmap threshold (32 MiB) maps it afresh and page-faults it in at each
  step (the scratch per step is measured by ``benchmarks/speed.py``,
  ``scratch MiB``; see :doc:`/results/design`). Optimization barriers are dropped before XLA:CPU
  schedules, so the dependence is data: ``+ z`` with
  ``z = (-0)·|min(finite values of the previous result)|``, which XLA cannot
  fold and which changes no value. It goes on the integer leaves (codes) where
  there are any — their consumers are table lookups, so XLA fuses the float
  arithmetic as it would without the dependence and results are bit-identical
  (``tests/test_engine_schedule.py``) — else on the float leaves.
  """
  if not done:
    return inputs
  previous = next(x for x in jax.tree.leaves(list(done.values())[-1]) if jnp.issubdtype(x.dtype, jnp.floating))
  # -0.0 (x + -0.0 is x for every x, signed zeros included) that XLA cannot know to be constant.
  zero = -0.0 * jnp.abs(jnp.min(jnp.where(jnp.isfinite(previous), previous, 0.0)))
  leaves = jax.tree.leaves(inputs)
  # Integer leaves (codes) where there are any: their consumers are table lookups, so XLA's fusion of the
  # float arithmetic, hence its rounding, stays as without the dependence.
  integer = any(jnp.issubdtype(x.dtype, jnp.integer) for x in leaves)
  return plus_zero(inputs, zero, jnp.integer if integer else jnp.floating)


def plus_zero(inputs: Any, zero: jax.Array, kind: Any = jnp.floating) -> Any:
  """``inputs`` with ``zero`` (a ``-0.0`` XLA cannot fold) added to their leaves of dtype ``kind``."""
  return jax.tree.map(lambda x: x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, kind) else x, inputs)


def after_all(inputs: Any, done: Any) -> Any:
  """``inputs`` unchanged (their float leaves), but data-dependent on every leaf of ``done``.

  The same ``+ (-0.0)·|…|`` dependence as :func:`after_previous`, on the
  minimum of each of ``done``'s leaves (a reduction, which any layout
  allows), so that XLA computes ``inputs``' consumers only after all of
  ``done``. A refresh's results all come from one conditional, so one of them
  (e.g. its failure count) stands for all.
  """
  mins = [jnp.min(jnp.where(jnp.isfinite(x), x, 0) if jnp.issubdtype(x.dtype, jnp.floating) else x)
          for x in jax.tree.leaves(done) if jnp.size(x)]
  if not mins:
    return inputs
  return plus_zero(inputs, -0.0 * jnp.abs(sum(m.astype(jnp.float32) for m in mins)))
