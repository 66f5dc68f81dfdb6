"""Grafting types, the grafting-only warm-up, the filtered gradient and the
``distributed_shampoo4`` recipe, against a float64 numpy reference step.

The reference is written here from Distributed Shampoo's description (Shi et
al. 2023; grafted direction per block or per tensor, AdaGrad / RMSProp / Adam
accumulators of the raw gradient, Adam's bias correction, filtered gradient
with bias correction, grafted method alone before ``start_preconditioning_step``)
on top of the paper's eigen pipeline (Alg. 3) without quantization.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference_shampoo as ref

import optax_shampoo4 as s4

MAX_ORDER = 4
SHAPE = (6, 5)  # blocks rows [0:4] [4:6] x cols [0:4] [4:5]
BETA, EPSILON = 0.9, 1e-3
STATS_EVERY, ROOT_EVERY = 1, 2
STEPS = 6


def _blocks(shape, max_order):
  cuts = [[(s, min(s + max_order, n)) for s in range(0, n, max_order)] for n in shape]
  return [(r, c) for r in cuts[0] for c in cuts[1]]




class ReferenceGrafting:
  """Float64 reference of scale_by_shampoo4's unquantized eigen format with grafting, for one tree."""

  def __init__(self, shapes, kind, eps, beta2, per_block, start=None, filter_beta=None):
    self.kind, self.eps, self.beta2, self.per_block = kind, eps, beta2, per_block
    self.start, self.filter_beta = start, filter_beta
    self.shapes = shapes
    self.factors = {}
    for i, shape in enumerate(shapes):
      if len(shape) == 2:
        for r, c in _blocks(shape, MAX_ORDER):
          m, n = r[1] - r[0], c[1] - c[0]
          self.factors[i, r, c] = (ref._EigenFactor(m, EPSILON), ref._EigenFactor(n, EPSILON))
    self.second = [np.zeros(s) for s in shapes]
    self.first = [np.zeros(s) for s in shapes]
    self.t = 0

  def step(self, grads):
    self.t += 1
    t = self.t
    grads = [np.asarray(g, np.float64) for g in grads]
    for (i, r, c), f in self.factors.items():
      g = grads[i][r[0]:r[1], c[0]:c[1]]
      if t % STATS_EVERY == 0:
        f[0].update_stats(g @ g.T, BETA)
        f[1].update_stats(g.T @ g, BETA)
      if t % ROOT_EVERY == 0 or t == self.start:
        f[0].update_root(EPSILON)
        f[1].update_root(EPSILON)
    xs = grads
    if self.filter_beta is not None:
      self.first = [self.filter_beta * m + (1 - self.filter_beta) * g for m, g in zip(self.first, grads)]
      xs = [m / (1 - self.filter_beta ** t) for m in self.first]
    if self.kind == "adagrad":
      self.second = [a + g * g for a, g in zip(self.second, grads)]
    elif self.kind in ("rmsprop", "adam"):
      self.second = [self.beta2 * a + (1 - self.beta2) * g * g for a, g in zip(self.second, grads)]
    if self.kind in ("frobenius", "sgd"):
      grafted = xs
    else:
      correction = 1 - self.beta2 ** t if self.kind == "adam" else 1.0
      grafted = [x / (np.sqrt(a / correction) + self.eps) for x, a in zip(xs, self.second)]
    outputs = []
    for i, (x, p_g) in enumerate(zip(xs, grafted)):
      if len(self.shapes[i]) != 2 or (self.start is not None and t < self.start):
        outputs.append(p_g)
        continue
      out = np.zeros_like(x)
      for r, c in _blocks(self.shapes[i], MAX_ORDER):
        f = self.factors[i, r, c]
        out[r[0]:r[1], c[0]:c[1]] = f[0].root @ x[r[0]:r[1], c[0]:c[1]] @ f[1].root
        if self.per_block:
          block = out[r[0]:r[1], c[0]:c[1]]
          out[r[0]:r[1], c[0]:c[1]] = ref.graft(block, p_g[r[0]:r[1], c[0]:c[1]])
      outputs.append(out if self.per_block else ref.graft(out, p_g))
    return outputs


def _grads(step, shapes):
  rng = np.random.default_rng(100 + step)
  return [rng.standard_normal(s).astype(np.float32) for s in shapes]


SHAPES = [SHAPE, (5,)]
# The eigen pipeline (Alg. 3) without quantization: eigenpairs refreshed by one warm-started QR step,
# roots from them (the fp32 format's coupled-Newton roots are float32-approximate on these tiny,
# rank-deficient factors).
SHAMPOO = dict(max_order=MAX_ORDER, beta=BETA, epsilon=EPSILON, stats_every=STATS_EVERY,
               root_every=ROOT_EVERY, min_quant_order=10**6, refresh_method="qr")


def _assert_close(got, want):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=3e-3, atol=3e-3 * np.abs(want).max())


@pytest.mark.parametrize("kind, per_block, eps, beta2", [
    ("frobenius", None, None, None),
    ("sgd", None, None, None),
    ("adagrad", True, 1e-3, None),
    ("rmsprop", False, None, None),  # Distributed Shampoo's defaults: eps 1e-10, beta2 0.99
    ("adam", True, 1e-8, 0.99),
])
def test_grafting_types_match_reference(kind, per_block, eps, beta2):
  tx = s4.scale_by_shampoo4(grafting=kind, grafting_eps=eps, grafting_beta2=beta2,
                            grafting_per_block=per_block, **SHAMPOO)
  resolved_per_block = kind != "frobenius" if per_block is None else per_block
  reference = ReferenceGrafting(SHAPES, kind, 1e-10 if eps is None else eps,
                                0.99 if beta2 is None else beta2, resolved_per_block)
  state = tx.init([jnp.zeros(s) for s in SHAPES])
  update = jax.jit(tx.update)
  for step in range(STEPS):
    grads = _grads(step, SHAPES)
    got, state = update([jnp.asarray(g) for g in grads], state)
    want = reference.step(grads)
    for g, w in zip(got, want):
      _assert_close(g, w)
  # The accumulators are parameter-shaped, float32, and really accumulate.
  if kind in ("adagrad", "rmsprop", "adam"):
    chex.assert_trees_all_equal_shapes(state.grafting.second_moment, [jnp.zeros(s) for s in SHAPES])
    _assert_close(state.grafting.second_moment[0], reference.second[0])


def test_defaults_are_distributed_shampoo_s():
  """eps 1e-10; beta2 0.99 (RMSProp) and 0.999 (Adam); per tensor for frobenius, per block otherwise."""
  for kind, beta2, per_block in (("rmsprop", 0.99, True), ("adam", 0.999, True), ("frobenius", 0.0, False),
                                 ("sgd", 0.0, True), ("adagrad", 0.0, True)):
    resolved = s4.grafting.resolve(kind, None, None, None)
    assert (resolved.eps, resolved.beta2, resolved.per_block) == (1e-10, beta2, per_block), kind


def test_start_preconditioning_step_and_filtered_gradient_match_reference():
  start = 3  # not a multiple of ROOT_EVERY: the roots are refreshed at this step too
  tx = s4.scale_by_shampoo4(grafting="adam", grafting_eps=1e-8, grafting_beta2=0.99,
                            start_preconditioning_step=start, filter_beta=0.8, **SHAMPOO)
  reference = ReferenceGrafting(SHAPES, "adam", 1e-8, 0.99, True, start=start, filter_beta=0.8)
  state = tx.init([jnp.zeros(s) for s in SHAPES])
  update = jax.jit(tx.update)
  for step in range(STEPS):
    grads = _grads(step, SHAPES)
    got, state = update([jnp.asarray(g) for g in grads], state)
    want = reference.step(grads)
    if step + 1 < start:  # the grafted method alone: Adam's direction
      first = reference.first[0] / (1 - 0.8 ** (step + 1))
      np.testing.assert_allclose(np.asarray(got[0]), first / (np.sqrt(
          reference.second[0] / (1 - 0.99 ** (step + 1))) + 1e-8), rtol=1e-4)
    for g, w in zip(got, want):
      _assert_close(g, w)


def test_grafting_state_is_params_for_map_params_and_stays_finite_on_bad_steps():
  tx = s4.scale_by_shampoo4(grafting="adagrad", filter_beta=0.9, **SHAMPOO)
  params = {"w": jnp.zeros(SHAPE), "b": jnp.zeros(5)}
  state = tx.init(params)
  mapped = optax.tree.map_params(tx, lambda p: jnp.full(p.shape, 7.0), state,
                                 transform_non_params=lambda x: x)
  # Both grafting trees are parameter-shaped, so map_params maps them; the factors are not.
  assert float(mapped.grafting.second_moment["w"][0, 0]) == 7.0
  assert float(mapped.grafting.first_moment["b"][0]) == 7.0
  chex.assert_trees_all_equal(mapped.factors, state.factors)
  # A non-finite gradient leaves the accumulators untouched and returns zeros.
  update = jax.jit(tx.update)
  grads = {"w": jnp.ones(SHAPE), "b": jnp.ones(5)}
  _, state = update(grads, state)
  bad = {"w": jnp.ones(SHAPE).at[0, 0].set(jnp.nan), "b": jnp.ones(5)}
  out, new_state = update(bad, state)
  chex.assert_trees_all_equal(new_state.grafting, state.grafting)
  chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, bad))


@pytest.mark.parametrize("kwargs, name", [
    (dict(grafting="adamw"), "grafting"),
    (dict(grafting_eps=-1.0), "grafting_eps"),
    (dict(grafting="rmsprop", grafting_beta2=1.0), "grafting_beta2"),
    (dict(grafting_per_block=1), "grafting_per_block"),
    (dict(start_preconditioning_step=-1), "start_preconditioning_step"),
    (dict(start_preconditioning_step=2.5), "start_preconditioning_step"),
    (dict(filter_beta=1.5), "filter_beta"),
    (dict(filter_bias_correction="yes"), "filter_bias_correction"),
])
def test_bad_grafting_arguments_name_themselves(kwargs, name):
  with pytest.raises((ValueError, TypeError), match=name):
    s4.scale_by_shampoo4(**kwargs)


# ----------------------------------------------------------------------------
# distributed_shampoo4


def test_distributed_shampoo4_matches_reference_step():
  lr, b1, b2, eps, wd, momentum = 0.05, 0.8, 0.99, 1e-8, 0.1, 0.5
  # The reference keeps the paper's statistic (relative epsilon, from epsilon I, vectors passed through) and
  # forms its roots every ROOT_EVERY steps, as a stored root (the alias' default layout forms them every step).
  opt = s4.distributed_shampoo4(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, momentum=momentum,
                                nesterov=True, epsilon_mode="relative", precondition_1d=False, store_root=True,
                                **{k: v for k, v in SHAMPOO.items()})
  reference = ReferenceGrafting(SHAPES, "adam", eps, b2, True, start=ROOT_EVERY, filter_beta=b1)
  rng = np.random.default_rng(7)
  params = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in SHAPES]
  ref_params = [np.asarray(p, np.float64) for p in params]
  ref_buffer = [np.zeros(s) for s in SHAPES]
  state = opt.init(params)
  update = jax.jit(opt.update)
  for step in range(STEPS):
    grads = _grads(step, SHAPES)
    updates, state = update([jnp.asarray(g) for g in grads], state, params)
    params = optax.apply_updates(params, updates)
    directions = [p + wd * w for p, w in zip(reference.step(grads), ref_params)]
    ref_buffer = [momentum * b + d for b, d in zip(ref_buffer, directions)]
    ref_params = [w - lr * (d + momentum * b) for w, d, b in zip(ref_params, directions, ref_buffer)]
    for got, want in zip(params, ref_params):
      np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-3, atol=1e-3)


def test_distributed_shampoo4_starts_preconditioning_at_root_every():
  """Before start_preconditioning_step (default: root_every) the step is Adam's, exactly."""
  params = {"w": jnp.zeros((8, 8)), "b": jnp.zeros(8)}
  opt = s4.distributed_shampoo4(1e-2, b1=0.9, b2=0.999, eps=1e-8, root_every=4, stats_every=2)
  adam = optax.adam(1e-2, b1=0.9, b2=0.999, eps=1e-8)
  state, adam_state = opt.init(params), adam.init(params)
  update = jax.jit(opt.update)
  for step in range(3):
    grads = jax.tree.map(lambda p, s=step: jnp.asarray(
        np.random.default_rng(s).standard_normal(p.shape), jnp.float32), params)
    got, state = update(grads, state, params)
    want, adam_state = adam.update(grads, adam_state, params)
    # Both are float32 Adam with the operations in another order: a few ulps of each moment, which cancellation
    # (m near 0) turns into up to 7e-8 absolute here (lr 1e-2); atol 1e-4 * lr has >= 10x headroom, and a step
    # that is not Adam's differs by O(lr).
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
