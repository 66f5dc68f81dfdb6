"""Tests of ``optax_shampoo4/shampoo.py`` (scale_by_shampoo4): algorithm fidelity, state stability, dtypes;
combine="caspr", store_root=False and root_method="jorge" in their own classes."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference_shampoo as ref

import optax_shampoo4 as s4
from optax_shampoo4 import factors as fct


def _random_grads(shape, steps, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]


def _mixed_tree():
  """Matrices, vectors, scalars, a conv kernel, a (1, 1, D) token, a split dim."""
  return {
      "dense": jnp.ones((24, 70)),  # 70 > max_order=32: blocks 32, 32, 6
      "bias": jnp.zeros((70,)),
      "scale": jnp.ones(()),
      "conv": jnp.ones((16, 3, 3, 3)),
      "token": jnp.ones((1, 1, 12)),
      "tall": jnp.ones((66, 5)),  # 66 = 32 + 32 + 2: remainder block of order 2
      "odd": jnp.ones((33, 17)),  # remainder of order 1
  }


def _signature(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


@pytest.mark.parametrize("shape, stats_every, root_every", [((6, 5), 1, 2), ((9, 4), 2, 4)])
def test_fp32_format_matches_algorithm_4(shape, stats_every, root_every):
  beta, epsilon = 0.9, 1e-3
  grads = _random_grads(shape, 8)
  expected = ref.shampoo_alg4(grads, beta, epsilon, stats_every, root_every)
  tx = s4.scale_by_shampoo4(beta=beta, epsilon=epsilon, stats_every=stats_every,
                            root_every=root_every, state_format="fp32")
  state = tx.init(jnp.zeros(shape))
  update = jax.jit(tx.update)
  for g, want in zip(grads, expected):
    got, state = update(jnp.asarray(g), state)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize("shape", [(6, 5), (12, 7)])
def test_unquantized_eigen_format_matches_algorithm_3(shape):
  beta, epsilon = 0.9, 1e-3
  grads = _random_grads(shape, 9, seed=1)
  expected = ref.shampoo_alg3_unquantized(grads, beta, epsilon, 1, 3)
  tx = s4.scale_by_shampoo4(beta=beta, epsilon=epsilon, stats_every=1, root_every=3,
                            min_quant_order=10**6, refresh_method="qr")
  state = tx.init(jnp.zeros(shape))
  assert not any(isinstance(leaf, s4.QuantizedArray) for leaf in
                 jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, s4.QuantizedArray)))
  update = jax.jit(tx.update)
  for g, want in zip(grads, expected):
    got, state = update(jnp.asarray(g), state)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("refresh_method, kwargs", [("eigh", {}), ("adaptive", {"refresh_tol": 0.0})])
def test_exact_refresh_makes_unquantized_eigen_format_match_32bit(refresh_method, kwargs):
  """With an exact eigendecomposition at every statistics update, the eigen format is Alg. 4."""
  beta, epsilon = 0.9, 1e-3
  grads = _random_grads((12, 7), 8, seed=2)
  expected = ref.shampoo_alg4(grads, beta, epsilon, 2, 4)
  tx = s4.scale_by_shampoo4(beta=beta, epsilon=epsilon, stats_every=2, root_every=4,
                            min_quant_order=10**6, refresh_method=refresh_method, **kwargs)
  state = tx.init(jnp.zeros((12, 7)))
  update = jax.jit(tx.update)
  for g, want in zip(grads, expected):
    got, state = update(jnp.asarray(g), state)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
  assert int(state.failed_refreshes) == 0


def test_adaptive_refresh_tol_can_be_injected():
  """refresh_tol is traced: τ = 1 keeps the initial basis (λ = diag A), τ = 0 decomposes; one compile."""
  static = ("max_order", "stats_every", "root_every", "bits", "quant_block", "min_quant_order")
  tx = optax.inject_hyperparams(s4.scale_by_shampoo4, static_args=static)(
      stats_every=1, root_every=1, min_quant_order=10**6)
  step = jax.jit(tx.update)
  grad = jnp.asarray(_random_grads((6, 5), 1, seed=3)[0])
  eigvals = {}
  for tol in (0.0, 1.0):
    state = tx.init(jnp.zeros((6, 5)))
    assert "refresh_tol" in state.hyperparams
    state.hyperparams["refresh_tol"] = jnp.float32(tol)
    _, state = step(grad, state)
    eigvals[tol] = np.asarray(state.inner_state.factors["order6_f32"].eigvals[0], np.float64)
  gram = np.asarray(grad, np.float64) @ np.asarray(grad, np.float64).T
  stat = 0.95 * 1e-6 * np.eye(6) + 0.05 * gram
  # float32 statistic (G Gᵀ: n eps ‖A‖) and eigh (Weyl with backward error 2n eps ‖A‖): 3n eps ‖A‖ absolute.
  want = np.linalg.eigvalsh(stat)[::-1]
  np.testing.assert_allclose(eigvals[0.0], want, rtol=0, atol=3 * 6 * np.finfo(np.float32).eps * want.max())
  np.testing.assert_allclose(eigvals[1.0], np.sort(np.diag(stat))[::-1], rtol=1e-5)
  assert step._cache_size() == 1


@pytest.mark.slow
@pytest.mark.parametrize("state_format", ["eigen", "naive", "fp32"])
def test_jit_on_mixed_tree_keeps_state_types(state_format):
  params = _mixed_tree()
  tx = s4.scale_by_shampoo4(max_order=32, stats_every=2, root_every=3, state_format=state_format,
                            min_quant_order=16, quant_block=8)
  state = tx.init(params)
  signature = _signature(state)
  update = jax.jit(tx.update)
  key = jax.random.key(0)
  for step in range(7):  # crosses T1 (2, 4, 6) and T2 (3, 6) steps
    key, sub = jax.random.split(key)
    grads = jax.tree.map(lambda p, k=sub: jax.random.normal(k, p.shape), params)
    out, state = update(grads, state)
    assert _signature(state) == signature, f"state changed at step {step + 1}"
    chex.assert_tree_all_finite((out, state))
    chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
    for name in ("bias", "scale", "token"):  # passthrough leaves
      np.testing.assert_array_equal(out[name], grads[name])
    for name in ("dense", "conv", "tall", "odd"):  # grafted to the gradient norm
      np.testing.assert_allclose(jnp.linalg.norm(out[name]), jnp.linalg.norm(grads[name]), rtol=1e-5)
  assert int(state.count) == 7
  assert int(state.failed_refreshes) == 0


def test_quantized_state_is_uint8_codes_and_f32_scales():
  tx = s4.scale_by_shampoo4()
  state = tx.init({"w": jnp.zeros((128, 96)), "v": jnp.zeros((8, 8))})
  quantized = [x for x in jax.tree.leaves(state.factors, is_leaf=lambda x: isinstance(x, s4.QuantizedArray))
               if isinstance(x, s4.QuantizedArray)]
  assert len(quantized) == 4  # eigvecs + root for the order-128 and order-96 buckets
  for q in quantized:
    assert q.codes.dtype == jnp.uint8 and q.scales.dtype == jnp.float32
    n = q.length
    assert q.codes.shape[-2:] == (n, (n + 1) // 2)
    assert q.scales.shape[-2:] == (n, -(-n // 64))
  small = state.factors["order8_f32"]
  assert small.eigvecs.dtype == jnp.float32 and small.eigvecs.shape == (2, 8, 8)


def test_identity_until_first_root_update():
  tx = s4.scale_by_shampoo4(stats_every=1, root_every=3)
  state = tx.init(jnp.zeros((80, 70)))
  update = jax.jit(tx.update)
  for step, g in enumerate(_random_grads((80, 70), 3), start=1):
    out, state = update(jnp.asarray(g), state)
    if step < 3:
      np.testing.assert_allclose(out, g, rtol=1e-6, atol=1e-6)
  assert not np.allclose(out, g, atol=1e-3)  # step 3 is preconditioned


@pytest.mark.slow
def test_refresh_schedule():
  tx = s4.scale_by_shampoo4(stats_every=3, root_every=6, min_quant_order=4)
  state = tx.init(jnp.zeros((8, 4)))
  update = jax.jit(tx.update)
  bucket = lambda st: st.factors["order8_q"]  # noqa: E731
  for step, g in enumerate(_random_grads((8, 4), 7), start=1):
    before = bucket(state)
    _, state = update(jnp.asarray(g), state)
    after = bucket(state)
    stats_changed = not np.array_equal(before.eigvals, after.eigvals)
    root_changed = not np.array_equal(before.root.diag, after.root.diag)
    assert stats_changed == (step % 3 == 0), step
    assert root_changed == (step % 6 == 0), step


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_in_low_precision_out(dtype):
  params = {"w": jnp.ones((70, 65), dtype), "b": jnp.ones((65,), dtype)}
  tx = s4.scale_by_shampoo4(stats_every=1, root_every=1)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape, dtype), params)
  out, new_state = jax.jit(tx.update)(grads, state)
  chex.assert_trees_all_equal_dtypes(out, grads)
  assert _signature(new_state) == _signature(state)
  assert new_state.factors["order70_q"].eigvals.dtype == jnp.float32
  chex.assert_tree_all_finite(out)


@pytest.mark.slow
def test_block_split_preconditions_each_block_independently():
  """A split matrix equals its blocks preconditioned alone, up to the joint graft."""
  g = jnp.asarray(_random_grads((40, 12), 1, seed=5)[0])
  kwargs = dict(stats_every=1, root_every=1, state_format="fp32")
  tx_split = s4.scale_by_shampoo4(max_order=20, **kwargs)
  out_split, _ = jax.jit(tx_split.update)(g, tx_split.init(g))
  tx_whole = s4.scale_by_shampoo4(max_order=64, **kwargs)
  parts = []
  for rows in (slice(0, 20), slice(20, 40)):
    block = g[rows]
    out, _ = jax.jit(tx_whole.update)(block, tx_whole.init(block))
    parts.append(out / jnp.linalg.norm(block))  # undo the per-block graft
  # Per-block directions agree; only the overall scale differs.
  for rows, part in zip((slice(0, 20), slice(20, 40)), parts):
    got = out_split[rows]
    cos = jnp.vdot(got, part) / (jnp.linalg.norm(got) * jnp.linalg.norm(part))
    assert float(cos) > 0.999


@pytest.mark.slow
def test_non_finite_gradient_leaves_statistics_untouched():
  tx = s4.scale_by_shampoo4(stats_every=1, root_every=2)
  state = tx.init(jnp.zeros((70, 66)))
  update = jax.jit(tx.update)
  good = jnp.asarray(_random_grads((70, 66), 1)[0])
  _, state = update(good, state)
  bad = good.at[3, 4].set(jnp.nan)
  _, new_state = update(bad, state)  # step 2 is a statistics and a root step
  for name, bucket in state.factors.items():
    chex.assert_trees_all_equal(new_state.factors[name].eigvecs, bucket.eigvecs)
    chex.assert_trees_all_equal(new_state.factors[name].eigvals, bucket.eigvals)
  chex.assert_tree_all_finite(new_state)
  assert int(new_state.skipped_stats) == 1 and int(new_state.failed_refreshes) == 0


@pytest.mark.slow
def test_init_on_shape_dtype_structs():
  tx = s4.scale_by_shampoo4()
  abstract = {"w": jax.ShapeDtypeStruct((300, 200), jnp.float32)}
  shapes = jax.eval_shape(tx.init, abstract)
  concrete = tx.init({"w": jnp.zeros((300, 200))})
  assert _signature(shapes) == _signature(concrete)


def test_extra_args_accepted_and_no_recompile():
  tx = optax.chain(s4.scale_by_shampoo4(stats_every=1, root_every=2), optax.scale_by_adam())
  params = {"w": jnp.zeros((20, 10))}
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(grads, state):
    traces.append(1)
    return tx.update(grads, state, params, loss=jnp.float32(1.0), unknown_arg="x")

  for g in _random_grads((20, 10), 3):
    _, state = step({"w": jnp.asarray(g)}, state)
  assert len(traces) == 1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(max_order=0), "max_order"),
        (dict(beta=1.5), "beta"),  # beta = 1 is valid: a running sum (Distributed Shampoo)
        (dict(beta=-0.1), "beta"),
        (dict(epsilon=-1e-6), "epsilon"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(stats_every=0), "stats_every"),
        (dict(root_every=2.5), "root_every"),
        (dict(state_format="int4"), "state_format"),
        (dict(bits=2), "bits"),
        (dict(mapping="log"), "mapping"),
        (dict(quant_block=63), "quant_block"),
        (dict(quant_block=0), "quant_block"),
        (dict(min_quant_order=0), "min_quant_order"),
        (dict(bjorck_steps=(1,)), "bjorck_steps"),
        (dict(bjorck_steps=(-1, 4)), "bjorck_steps"),
        (dict(root_method="cholesky"), "root_method"),
        (dict(state_format="naive", root_method="eigen"), "root_method"),
        (dict(refresh_method="lanczos"), "refresh_method"),
        (dict(qr_iterations=0), "qr_iterations"),
        (dict(qr_iterations=2.0), "qr_iterations"),
        (dict(refresh_tol=-0.1), "refresh_tol"),
        (dict(refresh_tol=1.5), "refresh_tol"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
  with pytest.raises(ValueError, match=name):
    s4.scale_by_shampoo4(**kwargs)


def test_integer_parameters_rejected_at_init():
  tx = s4.scale_by_shampoo4()
  with pytest.raises(TypeError, match=r"\['steps'\].*int32"):
    tx.init({"w": jnp.zeros((4, 4)), "steps": jnp.zeros((3,), jnp.int32)})


# --- combine="caspr" ------------------------------------------------------------------------------------


def _numpy_caspr(g, roots, plan_leaf):
  """float64 CASPR of every block of ``g`` from the state's roots, grafted to ‖G‖_F (per tensor)."""
  out = np.zeros_like(g)
  for b in plan_leaf.blocks:
    block = g[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]]
    left = roots[b.left.bucket.name][b.left.index]
    right = roots[b.right.bucket.name][b.right.index]
    j = left @ block + block @ right
    out[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] = left @ j + j @ right
  return out * np.linalg.norm(g) / np.linalg.norm(out)


class TestCaspr:
  """combine="caspr": J = L̂G + GR̂, Ĝ = L̂J + JR̂ per block, grafted, against a float64 numpy step."""

  @pytest.mark.slow
  @pytest.mark.parametrize("state_format", ["fp32", "naive", "eigen"])
  def test_caspr_equals_numpy_reference(self, state_format):
    rng = np.random.default_rng(0)
    max_order, min_quant_order = 48, 16
    shape = (40, 100)  # blocks 40x48, 40x48, 40x4: three right factors, one left order
    tx = s4.scale_by_shampoo4(state_format=state_format, combine="caspr", stats_every=1, root_every=1,
                              max_order=max_order, min_quant_order=min_quant_order, epsilon=1e-3)
    params = {"w": jnp.zeros(shape)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(2):  # the second step uses roots built from the first two gradients
      g = rng.standard_normal(shape).astype(np.float32)
      updates, state = step({"w": jnp.asarray(g)}, state)
    roots = {name: np.asarray(s4.factors.load(bucket.root), np.float64) for name, bucket in state.factors.items()}
    plan = s4.partition.make_plan([shape], max_order, min_quant_order, state_format != "fp32")
    expected = _numpy_caspr(g.astype(np.float64), roots, plan.leaves[0])
    np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=2e-4, atol=2e-5)
    # ... and it differs from the plain Shampoo combination of the same roots.
    shampoo = np.zeros_like(expected)
    for b in plan.leaves[0].blocks:
      shampoo[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] = (
          roots[b.left.bucket.name][b.left.index] @ g[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]]
          @ roots[b.right.bucket.name][b.right.index])
    shampoo *= np.linalg.norm(g) / np.linalg.norm(shampoo)
    assert np.linalg.norm(expected - shampoo) > 1e-3 * np.linalg.norm(shampoo)

  def test_caspr_alias_and_validation(self):
    with pytest.raises(ValueError, match="combine"):
      s4.scale_by_shampoo4(combine="kron")
    opt = s4.adamw_shampoo4(1e-3, combine="caspr", stats_every=1, root_every=1)
    params = {"w": jnp.ones((8, 6)), "b": jnp.zeros(6)}
    state = opt.init(params)
    updates, _ = jax.jit(opt.update)({"w": jnp.arange(48.0).reshape(8, 6), "b": jnp.ones(6)}, state, params)
    assert bool(jnp.all(jnp.isfinite(updates["w"])))


# --- store_root=False -------------------------------------------------------------------------------------


STORE_ROOT_EPSILON = 1e-4
STORE_ROOT_CONFIG = dict(stats_every=1, root_every=1, epsilon=STORE_ROOT_EPSILON, min_quant_order=16, quant_block=16)


def _store_root_params():
  return {"w": jnp.zeros((48, 32)), "b": jnp.zeros((32,))}


def _store_root_grads(step):
  key = jax.random.PRNGKey(step)
  w = jax.random.normal(key, (48, 32)) * jnp.linspace(0.2, 2.0, 32)  # anisotropic columns
  return {"w": w, "b": jax.random.normal(jax.random.fold_in(key, 1), (32,))}


def _np_bjorck(v, steps):
  for _ in range(steps):
    v = 1.5 * v - 0.5 * v @ v.T @ v
  return v


def _np_store_root(bucket, index, bjorck_steps):
  rows = np.asarray(fct.load(bucket.eigvecs)[index], np.float64)
  if fct.is_quantized(bucket.eigvecs):
    rows = _np_bjorck(rows, bjorck_steps)
  eigvals = np.asarray(bucket.eigvals[index], np.float64)
  damped = eigvals + STORE_ROOT_EPSILON * eigvals.max()
  return rows.T @ np.diag(damped ** -0.25) @ rows


def _run_store_root(steps, **kwargs):
  tx = s4.scale_by_shampoo4(**(STORE_ROOT_CONFIG | kwargs))
  state = tx.init(_store_root_params())
  update = jax.jit(tx.update)
  for step in range(steps):
    grads = _store_root_grads(step)
    updates, state = update(grads, state)
  return grads, updates, state


class TestStoreRoot:
  """``store_root=False``: no inverse root in the state, formed from the eigenpairs at every step.

  The reference is float64 numpy: from the state's dequantized eigenvectors,
  Björck-rectified in numpy, :math:`\\hat L = V (\\Lambda + \\epsilon \\lambda_{\\max})^{-1/4} V^\\top`,
  then :math:`\\hat L G \\hat R` grafted to :math:`\\|G\\|_F`.
  """

  @pytest.mark.parametrize("bits", [4, 8])
  def test_update_equals_float64_reference_from_the_stored_eigenpairs(self, bits):
    grads, updates, state = _run_store_root(4, store_root=False, bits=bits)
    buckets = state.factors
    left = next(b for name, b in buckets.items() if name.startswith("order48"))
    right = next(b for name, b in buckets.items() if name.startswith("order32"))
    assert left.root is None and right.root is None
    g = np.asarray(grads["w"], np.float64)
    preconditioned = _np_store_root(left, 0, 4) @ g @ _np_store_root(right, 0, 4)
    expected = preconditioned * np.linalg.norm(g) / np.linalg.norm(preconditioned)
    np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    # The preconditioner acted: the update is not the (rescaled) gradient.
    assert np.abs(expected - g).max() > 0.05 * np.abs(g).max()

  def test_matches_stored_root_when_roots_are_refreshed_every_step_in_float32(self):
    """Unquantized factors (order below min_quant_order): both settings compute the same roots."""
    kwargs = dict(min_quant_order=64)
    _, kept, _ = _run_store_root(3, **kwargs)
    _, formed, _ = _run_store_root(3, store_root=False, **kwargs)
    np.testing.assert_allclose(np.asarray(formed["w"]), np.asarray(kept["w"]), rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(kept["w"]).max()))

  def test_preconditioner_memory_halves(self):
    shapes = {"w": jax.ShapeDtypeStruct((768, 3072), jnp.float32)}
    nbytes = {}
    for store_root in (True, False):
      tx = s4.scale_by_shampoo4(store_root=store_root)
      nbytes[store_root] = s4.state_nbytes(jax.eval_shape(tx.init, shapes))
    assert nbytes[False]["diagonals"] == 0
    ratio = nbytes[False]["preconditioner"] / nbytes[True]["preconditioner"]
    assert 0.45 < ratio < 0.55, ratio

  def test_nonfinite_gradient_leaves_state_untouched(self):
    _, _, state = _run_store_root(2, store_root=False)
    tx = s4.scale_by_shampoo4(**STORE_ROOT_CONFIG, store_root=False)
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _store_root_grads(5))
    updates, new_state = jax.jit(tx.update)(bad, state)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    for a, b in zip(jax.tree.leaves(state.factors), jax.tree.leaves(new_state.factors)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(new_state.nonfinite_steps) == 1

  def test_alias_trains_with_store_root_false(self):
    """AdamW + 4-bit Shampoo without stored roots lowers a least-squares loss."""
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (256, 32))
    w_true = jax.random.normal(jax.random.fold_in(key, 1), (32, 24))
    y = x @ w_true

    def loss(params):
      return jnp.mean((x @ params["w"] - y) ** 2)

    params = {"w": jnp.zeros((32, 24))}
    opt = s4.adamw_shampoo4(3e-2, weight_decay=0.0, stats_every=5, store_root=False, min_quant_order=16)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
      grads = jax.grad(loss)(params)
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    start = float(loss(params))
    for _ in range(150):
      params, state = step(params, state)
    assert math.isfinite(float(loss(params))) and float(loss(params)) < 0.05 * start

  @pytest.mark.parametrize("kwargs, error", [
      (dict(state_format="naive"), ValueError),
      (dict(state_format="fp32"), ValueError),
      (dict(root_method="newton"), ValueError),
      (dict(store_root="no"), TypeError),
  ])
  def test_bad_store_root_combinations_raise_naming_the_argument(self, kwargs, error):
    args = dict(store_root=False) | kwargs
    with pytest.raises(error, match="store_root"):
      s4.scale_by_shampoo4(**args)

  @pytest.mark.skipif(len(jax.devices("cpu")) < 8, reason="needs 8 CPU devices (tests/conftest.py)")
  def test_sharded_roots_formed_per_device_match_single_device(self):
    """With a mesh each device forms its share of the roots; the updates equal one device's.

    Float32 factors (order below ``min_quant_order``), so no 4-bit code can flip
    between the two runs' rounding.
    """
    cpus = jax.devices("cpu")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=cpus[:8])
    kwargs = dict(STORE_ROOT_CONFIG, min_quant_order=64, store_root=False)
    results = []
    for m in (None, mesh):
      tx = s4.scale_by_shampoo4(mesh=m, **kwargs)
      with jax.default_device(cpus[0]):
        state = tx.init(_store_root_params())
        if m is not None:
          state = jax.device_put(state, s4.state_sharding(state, m))
        update = jax.jit(tx.update)
        outs = []
        for step in range(3):
          updates, state = update(_store_root_grads(step), state)
          outs.append(jax.device_get(updates["w"]))
      results.append(outs)
    for single, sharded in zip(*results):
      # Two compilations of the same float32 maths (measured 1e-4 of the largest update); a wrong shard is O(1).
      np.testing.assert_allclose(sharded, single, rtol=1e-3, atol=1e-3 * np.abs(single).max())


# --- root_method="jorge" ---------------------------------------------------------------------------------


class TestJorgeRootMethod:
  """``root_method="jorge"``: the stored root takes Jorge's update (``roots.jorge_root_update``) at each
  statistics update; no statistic is stored."""

  @pytest.mark.parametrize("state_format,bits,bound", [
      ("fp32", 4, 0.02), pytest.param("naive", 8, 0.03, marks=pytest.mark.slow),
      pytest.param("naive", 4, 0.2, marks=pytest.mark.slow)])
  def test_jorge_root_method_converges_to_damped_statistic_root(self, state_format, bits, bound):
    """A stationary gradient: the stored root approaches (M + δ‖M‖I)^(-1/4), M = G Gᵀ (float64 numpy).

    Measured after 150 updates: 0.15% (fp32), 1.0% (8-bit root), 16% (4-bit root: re-quantizing the root
    at every update lets its quantization error drift, unlike the paper's root rebuilt from eigenpairs).
    """
    rng = np.random.default_rng(0)
    g = rng.standard_normal((72, 96)).astype(np.float32) / 10
    eps = 1e-3
    tx = s4.scale_by_shampoo4(state_format=state_format, root_method="jorge", stats_every=1, root_every=1,
                              epsilon=eps, beta=0.9, min_quant_order=64, bits=bits)
    params = {"w": jnp.zeros((72, 96))}
    state = tx.init(params)
    assert state.factors["order72_q" if state_format == "naive" else "order72_f32"].stats is None
    step = jax.jit(tx.update)
    for _ in range(150):
      _, state = step({"w": jnp.asarray(g)}, state)
    assert int(state.failed_refreshes) == 0
    bucket = state.factors["order72_q" if state_format == "naive" else "order72_f32"]
    root = np.asarray(s4.factors.load(bucket.root), np.float64)[0]
    m = g.astype(np.float64) @ g.T.astype(np.float64)
    damped = m + eps * np.linalg.norm(m) * np.eye(72)
    lam, vecs = np.linalg.eigh(damped)
    expected = (vecs * lam ** -0.25) @ vecs.T
    error = np.linalg.norm(root - expected) / np.linalg.norm(expected)
    assert error < bound, error

  def test_jorge_root_method_validation_and_memory(self):
    with pytest.raises(ValueError, match="root_method='jorge'"):
      s4.scale_by_shampoo4(root_method="jorge")  # the eigen format keeps eigenvectors, not roots
    shapes = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)}
    jorge = s4.state_nbytes(jax.eval_shape(s4.scale_by_shampoo4(state_format="naive", root_method="jorge").init,
                                           shapes))
    naive = s4.state_nbytes(jax.eval_shape(s4.scale_by_shampoo4(state_format="naive").init, shapes))
    # Jorge keeps one quantized matrix per factor (the root), the naive format two (statistic and root).
    assert jorge["preconditioner"] * 2 == naive["preconditioner"]


# --- store_root="eigvals" ---------------------------------------------------------------------------------

EIGVALS_CONFIG = STORE_ROOT_CONFIG | dict(root_every=3, store_root="eigvals")


def _np_root_from(bucket, index, eigvals, bjorck_steps):
  """float64 :math:`V (\\Lambda + \\epsilon\\max\\lambda)^{-1/4} V^\\top` of the state's basis and ``eigvals``."""
  rows = np.asarray(fct.load(bucket.eigvecs)[index], np.float64)
  if fct.is_quantized(bucket.eigvecs):
    rows = _np_bjorck(rows, bjorck_steps)
  eigvals = np.maximum(np.asarray(eigvals, np.float64), 0.0)
  return rows.T @ np.diag((eigvals + STORE_ROOT_EPSILON * eigvals.max()) ** -0.25) @ rows


def _trajectory(steps, **kwargs):
  """The states after each of ``steps`` updates, with the last step's gradients and updates."""
  tx = s4.scale_by_shampoo4(**(EIGVALS_CONFIG | kwargs))
  state = tx.init(_store_root_params())
  update = jax.jit(tx.update)
  states = []
  for step in range(steps):
    grads = _store_root_grads(step)
    updates, state = update(grads, state)
    states.append(state)
  return grads, updates, states


class TestStoreRootEigvals:
  """``store_root="eigvals"``: no root matrix; the eigenvalues of the last root update with the current basis."""

  def test_eigenvalues_are_captured_at_root_updates_only(self):
    _, _, states = _trajectory(5, bits=8)
    for step, state in enumerate(states, start=1):
      for name, bucket in state.factors.items():
        assert bucket.root is None
        if step < 3:  # before the first root update (root_every=3): the initial eigenvalues, epsilon
          np.testing.assert_array_equal(np.asarray(bucket.root_eigvals), np.float32(STORE_ROOT_EPSILON))
        else:
          np.testing.assert_array_equal(np.asarray(bucket.root_eigvals), np.asarray(states[2].factors[name].eigvals))
    # After step 3 the statistics moved on (stats_every=1), so the roots use older eigenvalues than the basis.
    last = states[-1].factors
    assert all(not np.allclose(np.asarray(b.eigvals), np.asarray(b.root_eigvals), rtol=1e-3) for b in last.values())

  @pytest.mark.parametrize("bits", [4, 8])
  def test_update_equals_float64_reference_with_the_captured_eigenvalues(self, bits):
    """Step 5: current (rectified) basis with step 3's eigenvalues; fp32 products vs float64, 2e-3 relative."""
    grads, updates, states = _trajectory(5, bits=bits)
    buckets = states[-1].factors
    left = next(b for name, b in buckets.items() if name.startswith("order48"))
    right = next(b for name, b in buckets.items() if name.startswith("order32"))
    g = np.asarray(grads["w"], np.float64)
    roots = [_np_root_from(b, 0, b.root_eigvals[0], 4) for b in (left, right)]
    preconditioned = roots[0] @ g @ roots[1]
    expected = preconditioned * np.linalg.norm(g) / np.linalg.norm(preconditioned)
    np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    # The stale eigenvalues matter: with the current ones the update differs by far more than the tolerance.
    current = [_np_root_from(b, 0, b.eigvals[0], 4) for b in (left, right)]
    other = current[0] @ g @ current[1]
    other = other * np.linalg.norm(g) / np.linalg.norm(other)
    assert np.abs(other - expected).max() > 1e-2 * np.abs(expected).max()

  def test_equals_stored_root_at_a_root_update_in_float32(self):
    """Unquantized factors: on a root-update step both layouts apply the same root (the basis of that step)."""
    kwargs = dict(min_quant_order=64)
    _, formed, _ = _trajectory(3, **kwargs)
    _, kept, _ = _trajectory(3, store_root=True, **kwargs)
    np.testing.assert_allclose(np.asarray(formed["w"]), np.asarray(kept["w"]), rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(kept["w"]).max()))

  def test_memory_is_store_root_false_plus_one_vector_per_factor(self):
    shapes = {"w": jax.ShapeDtypeStruct((768, 3072), jnp.float32)}
    nbytes = {}
    for store_root in (False, "eigvals"):
      tx = s4.scale_by_shampoo4(store_root=store_root, bits=8)
      nbytes[store_root] = s4.state_nbytes(jax.eval_shape(tx.init, shapes))
    extra = nbytes["eigvals"]["preconditioner"] - nbytes[False]["preconditioner"]
    assert extra == nbytes[False]["eigenvalues"] > 0  # a second float32 vector as long as the eigenvalues

  def test_nonfinite_gradient_leaves_state_untouched(self):
    _, _, states = _trajectory(3)  # the bad step, step 4, is no root update (those re-capture the kept eigenvalues)
    tx = s4.scale_by_shampoo4(**EIGVALS_CONFIG)
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _store_root_grads(5))
    updates, new_state = jax.jit(tx.update)(bad, states[-1])
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    for a, b in zip(jax.tree.leaves(states[-1].factors), jax.tree.leaves(new_state.factors)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  @pytest.mark.parametrize("kwargs, error", [
      (dict(state_format="fp32"), ValueError),
      (dict(root_method="newton"), ValueError),
      (dict(store_root="eigenvalues"), TypeError),
  ])
  def test_bad_combinations_raise_naming_the_argument(self, kwargs, error):
    with pytest.raises(error, match="store_root"):
      s4.scale_by_shampoo4(**(dict(store_root="eigvals") | kwargs))


# --- head_fraction: the eigenvectors of the largest eigenvalues in more bits -------------------------------


def _statistic_leak(order: int = 64, **kwargs) -> float:
  """One statistics update re-encoding :math:`V\\Lambda V^\\top` (exact eigenpairs, no new gradient) through
  the stored basis; the largest relative error of the result's Rayleigh quotients in the 8 smallest-eigenvalue
  directions (float64 from the decoded, rectified rows). Spectrum: 4 eigenvalues in [0.1, 1], the rest in
  [1e-6, 1e-4], so the rounding of the 4 top rows (about delta * lambda_max) dominates the smallest ones."""
  rng = np.random.default_rng(0)
  basis, _ = np.linalg.qr(rng.standard_normal((order, order)))
  eigvals = np.concatenate([np.logspace(0, -1, 4), np.logspace(-4, -6, order - 4)])
  config = s4.options.ShampooOptions.from_kwargs(**kwargs).factor_config()
  bucket = fct.EigenFactors(config.store_eigvecs(jnp.asarray(basis.T[None], jnp.float32), True),
                            jnp.asarray(eigvals[None], jnp.float32), None)
  new, ok = fct.update_stats(config, bucket, jnp.zeros((1, order, order)), 1.0)
  assert bool(ok[0])
  rows = np.asarray(fct.rectified(new.eigvecs, config.bjorck_steps[0]), np.float64)[0]
  stat = rows.T @ np.diag(np.asarray(new.eigvals[0], np.float64)) @ rows
  small = basis[:, -8:]
  quotients = np.einsum("ij,ik,kj->j", small, stat, small)
  return float(np.max(np.abs(quotients - eigvals[-8:]) / eigvals[-8:]))


class TestHeadRows:
  """``head_fraction``: the rows of the largest eigenvalues in ``head_bits`` (16) bits, the rest in ``bits``."""

  @pytest.mark.parametrize("tail_rectify", [pytest.param("bjorck", marks=pytest.mark.slow), "qr"])  # bjorck ~8 s
  def test_head_keeps_the_top_rows_rounding_out_of_the_smallest_eigenvalues(self, tail_rectify):
    """8-bit rows put about delta*lambda_max (delta ~ 1e-2) into eigenvalues of 1e-6: off by 2.4x (measured);
    16-bit head rows (delta ~ 2e-5) leave the 8-bit tail rows' own error, about 1e-2 * 1e-4 / 1e-6 = 1 %
    (measured 0.6 % / 1.3 %): the bound 0.15 has 10x headroom, and 0.5 separates the two."""
    assert _statistic_leak(bits=8) > 0.5
    assert _statistic_leak(bits=8, head_fraction=1 / 16, tail_rectify=tail_rectify) < 0.15

  def test_state_layout_and_bytes(self):
    kwargs = dict(bits=8, store_root="eigvals", head_fraction=1 / 16, tail_rectify="qr")
    shapes = {"w": jax.ShapeDtypeStruct((768, 3072), jnp.float32)}
    state = jax.eval_shape(s4.scale_by_shampoo4(**kwargs).init, shapes)
    for bucket in state.factors.values():
      order = bucket.eigvals.shape[-1]
      assert isinstance(bucket.eigvecs, s4.quantization.SplitRowsQuantized)
      assert bucket.eigvecs.head.codes.shape[-2] == math.ceil(order / 16) and bucket.eigvecs.head.bits == 16
      assert bucket.eigvecs.tail.bits == 8
    # The 16-bit head of 1/16 of the rows costs what the 8-bit basis saves on the paper's layout (4-bit basis + root).
    paper = s4.state_nbytes(jax.eval_shape(s4.scale_by_shampoo4().init, shapes))["preconditioner"]
    assert s4.state_nbytes(state)["preconditioner"] <= paper

  @pytest.mark.slow  # ~10 s on 2 cores
  def test_trains_under_jit_with_a_stored_root_too(self):
    for store_root in (True, "eigvals"):
      _, updates, states = _trajectory(4, bits=8, head_fraction=1 / 16, store_root=store_root)
      chex.assert_tree_all_finite(updates)
      assert int(states[-1].failed_refreshes) == 0

  @pytest.mark.parametrize("kwargs, name", [
      (dict(head_fraction=1 / 16, state_format="fp32"), "head_fraction"),
      (dict(head_fraction=1.0), "head_fraction"),
      (dict(head_fraction=1 / 16, bits=8, head_bits=8), "head_bits"),
      (dict(tail_rectify="qr_every_step"), "tail_rectify"),
  ])
  def test_bad_values_raise_naming_the_argument(self, kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
      s4.scale_by_shampoo4(**kwargs)
