"""The float64 transcriptions of the SOAP authors' code and of Meta's Distributed Shampoo, and what matches them.

Invariants of each transcription (cheap, derivable by hand), then step-for-step
comparisons: the dense float32 JAX SOAP of ``benchmarks/soap_reference.py``
against the SOAP transcription, and ``distributed_shampoo4(state_format="fp32")``
against the Meta transcription where the library has the options to match;
where it has not, the twin helpers name the missing semantics.

Tolerance of the step-for-step comparisons: float32 runs against float64 on
the same minibatches, measured as the largest parameter deviation relative to
the reference's displacement. Each step's update carries the float32 error of
a few matrix products, a QR / eigh / inverse root of a well-conditioned 8x8
matrix (relative error O(n u kappa) ~ 1e-5 with u = 6e-8, kappa <= 100) and
Adam's division; observed deviations are <= 4e-5 (SOAP) and <= 2e-6 (Meta) over
60 steps, so 1e-3 and 1e-4 keep >= 25x / 50x headroom while a wrong sign,
order, bias correction or missed fold gives O(1e-2..1) deviations.
"""

import numpy as np
import pytest
import reference_meta_shampoo as meta
import reference_soap as soap
import reference_twins as twins

from benchmarks.soap_reference import soap_reference

STEPS = 60


def _regression_batches(n_in, n_out, steps=STEPS, batch=32, seed=0):
  return twins.regression_batches(n_in, n_out, steps, batch, seed)


def _loss(params, batch):
  residual = batch["x"] @ params["w"] + params.get("b", 0.0) - batch["y"]
  return 0.5 * (residual**2).mean()


def _grad64(batches):
  def grad(params, call):
    x, y = batches["x"][call], batches["y"][call]
    residual = x @ params["w"] + params.get("b", 0.0) - y
    grads = {"w": x.T @ residual / residual.size}
    if "b" in params:
      grads["b"] = residual.sum(0) / residual.size
    return grads
  return grad


# ---------------------------------------------------------------- SOAP transcription invariants


def test_soap_first_call_builds_sorted_eigenbasis_without_update():
  rng = np.random.default_rng(1)
  param, grad = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
  cfg = soap.SoapConfig()
  new, state = soap.soap_step(param, grad, soap.init_state(param, cfg), cfg)
  np.testing.assert_array_equal(new, param)
  assert state.step == 0
  for k, q in enumerate(state.bases):
    np.testing.assert_allclose(q.T @ q, np.eye(q.shape[0]), atol=1e-12)
    stat = (1 - cfg.b2) * soap.outer_product(grad, k)
    np.testing.assert_allclose(state.stats[k], stat, atol=1e-14)
    eig = np.diag(q.T @ stat @ q)
    assert np.all(np.diff(eig) <= 1e-12)  # descending
    np.testing.assert_allclose(q.T @ stat @ q, np.diag(eig), atol=1e-12)


def test_soap_second_call_is_sign_adam_step_in_the_basis():
  # By hand: after call 1, m = (1-b1) G', v = (1-b2) G'^2, c = sqrt(1-b2)/(1-b1), so the step is
  # -lr * c * Q_L [(1-b1) G' / (sqrt(1-b2) |G'| + eps)] Q_R^T = -lr * Q_L sign(G') Q_R^T (eps -> 0).
  rng = np.random.default_rng(2)
  param, g1, g2 = (rng.normal(size=(4, 3)) for _ in range(3))
  cfg = soap.SoapConfig(lr=0.1, eps=0.0, weight_decay=0.0)
  _, state = soap.soap_step(param, g1, soap.init_state(param, cfg), cfg)
  new, _ = soap.soap_step(param, g2, state, cfg)
  ql, qr = state.bases
  np.testing.assert_allclose(new, param - 0.1 * ql @ np.sign(ql.T @ g2 @ qr) @ qr.T, atol=1e-12)


def test_soap_weight_decay_is_applied_after_the_step():
  rng = np.random.default_rng(3)
  param, g1, g2 = (rng.normal(size=(3, 3)) for _ in range(3))
  decayed = soap.SoapConfig(lr=0.1, eps=0.0, weight_decay=0.5)
  plain = soap.SoapConfig(lr=0.1, eps=0.0, weight_decay=0.0)
  outs = []
  for cfg in (decayed, plain):
    _, state = soap.soap_step(param, g1, soap.init_state(param, cfg), cfg)
    outs.append(soap.soap_step(param, g2, state, cfg)[0])
  np.testing.assert_allclose(outs[0], outs[1] * (1 - 0.1 * 0.5), atol=1e-12)


def test_soap_refresh_keeps_bases_orthonormal_and_only_permutes_v():
  rng = np.random.default_rng(4)
  cfg = soap.SoapConfig(precondition_frequency=1, weight_decay=0.0)
  param = rng.normal(size=(6, 5))
  state = soap.init_state(param, cfg)
  for _ in range(4):
    param, state = soap.soap_step(param, rng.normal(size=(6, 5)), state, cfg)
  stats = soap.fold_statistics(state.stats, rng.normal(size=(6, 5)), cfg.statistic_beta)
  bases, v = soap.qr_refresh(stats, state.bases, state.exp_avg_sq)
  for q in bases:
    np.testing.assert_allclose(q.T @ q, np.eye(q.shape[0]), atol=1e-12)
  np.testing.assert_allclose(np.sort(v, axis=None), np.sort(state.exp_avg_sq, axis=None))
  # Many power steps on a fixed statistic converge to its eigenbasis (descending eigenvalues).
  for _ in range(300):
    bases, v = soap.qr_refresh(stats, bases, v)
  for k, q in enumerate(bases):
    rotated = q.T @ stats[k] @ q
    np.testing.assert_allclose(rotated, np.diag(np.diag(rotated)), atol=1e-8 * np.abs(rotated).max())
    assert np.all(np.diff(np.diag(rotated)) <= 1e-12)


def test_soap_1d_parameters_get_plain_adam():
  rng = np.random.default_rng(5)
  cfg = soap.SoapConfig(lr=0.01, weight_decay=0.0, eps=1e-8)
  param = rng.normal(size=7)
  state = soap.init_state(param, cfg)
  grads = rng.normal(size=(4, 7))
  param0 = param.copy()
  for g in grads:
    param, state = soap.soap_step(param, g, state, cfg)
  m = v = 0.0
  expected = param0.copy()
  for t, g in enumerate(grads[1:], start=1):  # call 1 is skipped; its gradient never enters the moments
    m, v = cfg.b1 * m + (1 - cfg.b1) * g, cfg.b2 * v + (1 - cfg.b2) * g**2
    expected -= cfg.lr * np.sqrt(1 - cfg.b2**t) / (1 - cfg.b1**t) * m / (np.sqrt(v) + cfg.eps)
  np.testing.assert_allclose(param, expected, atol=1e-12)


# ---------------------------------------------------------------- Meta transcription invariants


@pytest.mark.parametrize("shape,threshold,target,expected", [
    ((1, 2, 5, 1), 10, 1, (10,)),
    ((1, 2, 5, 1), 1, 1, (2, 5)),
    ((32, 3, 64, 64), 8192, 1, (96, 4096)),
    ((32, 3, 64, 64), 1_000_000, 2, (32, 12288)),
    ((8, 6), 8, 1, (8, 6)),
])
def test_meta_merge_small_dims_matches_its_documented_examples(shape, threshold, target, expected):
  assert meta.merge_small_dims(shape, threshold, target) == expected


def test_meta_inverse_root_is_bias_corrected_and_absolutely_damped():
  rng = np.random.default_rng(6)
  a = rng.normal(size=(5, 5))
  factor = a @ a.T
  root = meta.inverse_root(factor, 0.25, 1e-3, 4)
  damped = factor / 0.25 + 1e-3 * np.eye(5)
  np.testing.assert_allclose(np.linalg.matrix_power(root, 4) @ damped, np.eye(5), atol=1e-9)


def test_meta_first_step_is_the_polar_factor_and_normalized_vector():
  # By hand (b1 = 0, beta2 = 1, frequency 1, no grafting, epsilon -> 0): F_L = G G^T, F_R = G^T G, so
  # F_L^{-1/4} G F_R^{-1/4} = U S^{-1/2} S S^{-1/2} V^T = U V^T for G = U S V^T; a vector g gets one
  # factor g g^T + eps I and exponent -1/2: g / sqrt(|g|^2 + eps).
  rng = np.random.default_rng(7)
  cfg = meta.MetaConfig(lr=0.5, b1=0.0, b2=1.0, epsilon=1e-30, max_preconditioner_dim=4, grafting=None)
  g = rng.normal(size=(4, 4))
  new, _ = meta.meta_step(np.zeros((4, 4)), g, meta.init_state(np.zeros((4, 4)), cfg), cfg)
  u, _, vt = np.linalg.svd(g)
  np.testing.assert_allclose(new, -0.5 * u @ vt, atol=1e-8)
  vec = rng.normal(size=6)
  cfg1 = meta.MetaConfig(lr=0.5, b1=0.0, b2=1.0, epsilon=1e-6, grafting=None)
  new, _ = meta.meta_step(np.zeros(6), vec, meta.init_state(np.zeros(6), cfg1), cfg1)
  np.testing.assert_allclose(new, -0.5 * vec / np.sqrt(vec @ vec + 1e-6), rtol=1e-9)


def test_meta_grafting_sets_the_norm_and_warmup_uses_adam():
  rng = np.random.default_rng(8)
  cfg = meta.MetaConfig(lr=1.0, b1=0.0, b2=0.9, precondition_frequency=3, max_preconditioner_dim=5,
                        grafting=("adam", 0.999, 1e-8))
  param = np.zeros((5, 4))
  state = meta.init_state(param, cfg)
  for t in range(1, 5):
    g = rng.normal(size=(5, 4))
    new, state = meta.meta_step(param, g, state, cfg)
    adam = g / (np.sqrt(state.graft_acc / (1 - 0.999**t)) + 1e-8)
    if t < 3:  # before start_preconditioning_step (= frequency): the grafted method alone
      np.testing.assert_allclose(new, -adam, rtol=1e-12)
    else:
      np.testing.assert_allclose(np.linalg.norm(new), np.linalg.norm(adam), rtol=1e-12)
      assert not np.allclose(new, -adam, rtol=1e-3)


def test_meta_blocks_cover_the_parameter():
  cfg = meta.MetaConfig(max_preconditioner_dim=3, target_dimensionality=float("inf"))
  x = np.arange(35.0).reshape(7, 5)
  blocks = meta.blocks_of(x, cfg)
  assert [b.shape for b in blocks] == [(3, 3), (3, 2), (3, 3), (3, 2), (1, 3), (1, 2)]
  np.testing.assert_array_equal(meta.from_blocks(blocks, x.shape, cfg), x)


# ---------------------------------------------------------------- step-for-step comparisons


def test_jax_reference_soap_equals_the_transcription_step_for_step():
  # Square weight: both factors are full rank from the first gradient (for a non-square one the first
  # eigh basis of the rank-deficient factor is arbitrary in its null space, in the reference too).
  batches = _regression_batches(8, 8)
  rng = np.random.default_rng(9)
  params0 = {"w": rng.normal(size=(8, 8)) * 0.1, "b": np.zeros(8)}
  cfg = soap.SoapConfig(lr=1e-2, weight_decay=0.01, precondition_frequency=5)
  history = soap.run_soap(params0, _grad64(batches), STEPS, cfg)
  opt = soap_reference(1e-2, weight_decay=0.01, precondition_every=5)
  deviation = twins.max_relative_deviation(opt, history, params0, _loss, batches)
  assert deviation[1:].max() < 1e-3, deviation


def test_distributed_shampoo4_fp32_equals_meta_where_it_has_the_options():
  batches = _regression_batches(8, 6)
  rng = np.random.default_rng(10)
  params0 = {"w": rng.normal(size=(8, 6)) * 0.1}
  cfg = meta.MetaConfig(lr=1e-2, b1=0.9, b2=0.95, epsilon=1e-12, precondition_frequency=5,
                        max_preconditioner_dim=8, grafting=("adam", 0.999, 1e-8))
  history = meta.run_meta(params0, _grad64(batches), STEPS, cfg)
  opt = twins.library_meta_twin(cfg, [(8, 6)])
  deviation = twins.max_relative_deviation(opt, history, params0, _loss, batches)
  assert deviation.max() < 1e-4, deviation


def test_twin_helpers_name_the_missing_semantics():
  defaults = meta.MetaConfig(grafting=("adam", 0.999, 1e-8))
  missing = twins.missing_meta_semantics(defaults, [(16, 8), (8,), (40, 50, 30)])
  assert any("merge_small_dims" in m for m in missing)
  assert any("one factor per dimension" in m for m in missing)
  assert not any("(8,)" in m for m in missing)  # vectors are preconditioned as Meta does
  with pytest.raises(NotImplementedError, match="merge_small_dims"):
    twins.library_meta_twin(defaults, [(16, 8)])
  with pytest.raises(NotImplementedError, match="weight decay applied after the step"):
    twins.library_soap_twin(soap.SoapConfig())  # the authors' default weight decay 0.01
