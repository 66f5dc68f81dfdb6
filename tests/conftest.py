"""Test setup: the repository root is importable (for ``benchmarks.model_shapes``),
so is ``tests/`` (the shared ``helpers`` and the ``reference_*`` transcriptions,
also for the tests in ``tests/integration/``), numpy's BLAS runs single-threaded,
and the CPU backend has 8 devices.

Layout: ``tests/test_<module>.py`` tests ``optax_shampoo4/<module>.py``;
``tests/integration/`` holds the tests that cross modules (training, examples,
docs, packaging, checkpoints, multi-process and multi-device runs, ...).

The 8 CPU devices are for the sharding tests; they must be set before
JAX initializes a backend, and conftest.py is imported before any test module.
Every other test still runs on one device (the default device is the first CPU
device); measured, the rest of the suite takes the same CPU time with 8 CPU
devices as with 1.
"""

import pathlib
import sys

import jax
import pytest

_TESTS = pathlib.Path(__file__).resolve().parent
for _path in (str(_TESTS.parent), str(_TESTS)):
  if _path not in sys.path:
    sys.path.insert(0, _path)

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(autouse=True, scope="session")
def _single_threaded_blas():
  """OpenBLAS threads fight XLA's for a small machine's cores (float64 SVD/eigh
  at n = 256 get ~30x slower under load); the float64 references are small."""
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:  # optional: only a speed-up
    yield
    return
  with threadpool_limits(limits=1, user_api="blas"):
    yield


# The longest tests of the default run (measured with --durations on a 2-core machine, each >= 6 s), moved to the
# slow run (`python -m pytest -m slow`, which .ci/run also runs) so that the default run stays under 10 minutes.
# They are marked here, in one place, by node id; a test file can still mark its own tests slow as usual.
SLOW_BY_DURATION = frozenset({
    "tests/test_sharding.py::test_sharded_trajectory_matches_single_device[naive]",
    "tests/test_training.py::test_shampoo_beats_adamw_at_equal_steps",
    "tests/test_moments.py::test_inject_hyperparams_with_moment_bits",
    "tests/test_distributed_step.py::test_per_device_matmul_flops_split_over_the_mesh",
    "tests/test_sharding.py::test_padding_slots_never_influence_updates[eigen]",
    "tests/test_caspr.py::test_caspr_equals_numpy_reference[eigen]",
    "tests/test_sharding.py::test_sharded_trajectory_matches_single_device[fp32]",
    "notebooks/quantization_explained.ipynb::quantization_explained.ipynb",
    "notebooks/training_comparison.ipynb::training_comparison.ipynb",
    "optax_shampoo4/state_utils.py::optax_shampoo4.state_utils.convert_state",
    "optax_shampoo4/soap.py::optax_shampoo4.soap.scale_by_soap4",
    "tests/test_alias.py::test_adamw_mask_limits_weight_decay",
    "tests/test_caspr.py::test_caspr_equals_numpy_reference[fp32]",
    "tests/test_caspr.py::test_caspr_equals_numpy_reference[naive]",
    "tests/test_checkpoint.py::test_flax_nnx_optimizer_resumes_identically",
    "tests/test_checkpoint.py::test_resumed_training_follows_the_uninterrupted_trajectory",
    "tests/test_distributed_step.py::test_apply_blocks_on_a_mesh_matches_float64",
    "tests/test_distributed_step.py::test_resume_on_8_4_1_8_devices_follows_the_single_device_run[auto]",
    "tests/test_distributed_step.py::test_resume_on_8_4_1_8_devices_follows_the_single_device_run[explicit]",
    "tests/test_distributed_step.py::test_split_update_equals_single_device[auto]",
    "tests/test_distributed_step.py::test_split_update_equals_single_device[explicit]",
    "tests/test_examples.py::test_autoencoder_smoke",
    "tests/test_examples.py::test_cnn_digits_smoke",
    "tests/test_examples.py::test_transformer_lm_smoke_and_saved_statistic",
    "tests/test_factors.py::test_adaptive_refresh_is_exact_from_the_initial_identity_basis",
    "tests/test_factors.py::test_eigen_pipeline_beats_naive_on_ill_conditioned_1024",
    "tests/test_factors.py::test_non_finite_refresh_keeps_previous_factor[eigen]",
    "tests/test_factors.py::test_update_stats_without_a_root[qr]",
    "tests/test_failures.py::test_degenerate_shapes[eigen]",
    "tests/test_failures.py::test_degenerate_shapes[naive]",
    "tests/test_jorge.py::test_jorge_root_method_converges_to_damped_statistic_root[naive-4-0.2]",
    "tests/test_jorge.py::test_jorge_root_method_converges_to_damped_statistic_root[naive-8-0.03]",
    "tests/test_linalg.py::test_concurrent_bucket_refreshes_do_not_deadlock_on_cpu",
    "tests/test_memory.py::test_abstract_and_concrete_states_measure_the_same[eigen]",
    "tests/test_moments.py::test_bf16_params_keep_their_dtype[4]",
    "tests/test_moments.py::test_bits_none_is_optax_and_small_tensors_match_optax",
    "tests/test_moments.py::test_flax_nnx_optimizer_keeps_the_state_across_steps",
    "tests/test_moments.py::test_orbax_round_trip_is_bit_exact",
    "tests/test_moments.py::test_quantized_adam_tracks_float32_adam",
    "tests/test_moments.py::test_quantized_momentum_and_adagrad_train",
    "tests/test_moments.py::test_rank1_second_moment_round_trip_matches_numpy_within_stated_bound",
    "tests/test_moments.py::test_second_moment_never_negative_and_positive_never_zero[4]",
    "tests/test_moments.py::test_state_is_stable_under_lax_cond",
    "tests/test_optax_conventions.py::test_multisteps_accumulates_in_f32_and_bf16[adamw-eigen]",
    "tests/test_optax_conventions.py::test_partition_shampoo_on_matrices_adam_on_the_rest",
    "tests/test_optax_conventions.py::test_state_types_stable_under_lax_cond[adamw-eigen]",
    "tests/test_properties.py::test_random_trees_and_configs_give_finite_updates_of_the_right_dtype_and_shape",
    "tests/test_quantization.py::test_3bit_shampoo_training_smoke[eigen]",
    "tests/test_quantization.py::test_quantize_under_jit_and_vmap",
    "tests/test_sharding.py::test_distributed_example_trains",
    "tests/test_sharding.py::test_fsdp_params_sharded_along_first_axis[auto]",
    "tests/test_sharding.py::test_fsdp_params_sharded_along_first_axis[explicit]",
    "tests/test_sharding.py::test_sharded_update_matches_single_device_step_by_step[eigen]",
    "tests/test_sharding.py::test_sharded_update_matches_single_device_step_by_step[fp32]",
    "tests/test_sharding.py::test_sharded_update_matches_single_device_step_by_step[naive]",
    "tests/test_sharding.py::test_two_dimensional_mesh_splits_factors_over_data[eigen]",
    "tests/test_soap_sharding.py::test_sharded_soap_matches_single_device[eigen]",
    "tests/test_soap_sharding.py::test_sharded_soap_matches_single_device[fp32]",
    "tests/test_training.py::test_four_bit_tracks_32_bit",
    "tests/test_transform.py::test_block_split_preconditions_each_block_independently",
    "tests/test_transform.py::test_init_on_shape_dtype_structs",
    "tests/test_transform.py::test_jit_on_mixed_tree_keeps_state_types[eigen]",
    "tests/test_transform.py::test_jit_on_mixed_tree_keeps_state_types[fp32]",
    "tests/test_transform.py::test_jit_on_mixed_tree_keeps_state_types[naive]",
    "tests/test_transform.py::test_low_precision_in_low_precision_out[bfloat16]",
    "tests/test_transform.py::test_low_precision_in_low_precision_out[float16]",
    "tests/test_transform.py::test_non_finite_gradient_leaves_statistics_untouched",
    "tests/test_transform.py::test_refresh_schedule",
})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.nodeid in SLOW_BY_DURATION:
      item.add_marker(pytest.mark.slow)
