#!/usr/bin/env bash
# One-shot accelerator check: the fast tests on the GPU, then the speed and quality benchmarks at
# reduced size, the per-step products' precision (optimizer step on GPT-2 124M shapes and the
# transformer example's training step, each precision against optax.adamw) and the multi-device
# path, in about 10 minutes on one GPU. Writes JSON (and the tests' JUnit XML) under OUT_DIR.
#
#   benchmarks/gpu_check.sh [OUT_DIR]           # on a machine whose Python has JAX with CUDA
#   benchmarks/gpu_check.sh --cpu --tiny [DIR]  # on CPU, GPU assertions skipped, smallest size
#
# OUT_DIR: the argument, else $OUT, else benchmarks/results/gpu_check. Run from the repository root;
# nothing is installed (needs jax, optax, flax, chex, pytest; stages whose extra modules are missing
# are recorded as skipped). Flags: --cpu (or S4_GPU_CHECK_CPU=1) runs on CPU and skips the GPU
# assertions; --tiny runs every stage at its smallest size (a smoke test of this script).
# Stage results, times and the environment go to OUT_DIR/gpu_check.json; the exit status is 1 if a
# stage failed.
set -u -o pipefail

CPU=${S4_GPU_CHECK_CPU:-0}
SIZE=reduced
OUT_DIR=""
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU=1 ;;
    --tiny) SIZE=tiny ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "unknown flag $arg" >&2; exit 2 ;;
    *) OUT_DIR=$arg ;;
  esac
done
OUT_DIR=${OUT_DIR:-${OUT:-benchmarks/results/gpu_check}}
mkdir -p "$OUT_DIR/runs"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if [ "$CPU" = 1 ]; then export JAX_PLATFORMS=cpu; fi
XLA_FLAGS_IN=${XLA_FLAGS:-}
PY=${PYTHON:-python}
STAGES="$OUT_DIR/stages.txt"
: > "$STAGES"

if [ "$SIZE" = tiny ]; then
  # Every stage at its smallest: on CPU each optimizer's compilation dominates, so few optimizers, the
  # smallest models (speed.py's micro decoder, a 1-layer d_model 32 transformer example) and 1-2 steps.
  # XLA's backend optimization is off for the same reason (the run times of a smoke run are moot), except in
  # the distributed stage, whose time is mostly running (refresh steps of speed.py's small decoder).
  MICRO_LM=(--layers 1 --d-model 32 --d-mlp 64 --context 16)
  TESTS=(tests/test_partition.py tests/integration/test_distributed_step.py -k "schedule_splits or schedule_covers")
  # speed: AdamW and 4-bit Shampoo (SOAP: precision_speed); a bare --train-batches (no sizes) skips its table
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0"
  SPEED=(--model-size micro --steps 1 --repeats 1 --budget 1 --warmup 1 --skip-peers --skip-profile
         --formats eigen --only adamw+shampoo4 --train-batches)
  QUALITY=(--examples transformer_lm --seeds 0 --steps 2 --variants shampoo4 --extra "${MICRO_LM[@]}")
  # Limits: >= 3x each stage's wall time seen on 2 CPU cores at load average 9-13 (other jobs): device 37-71,
  # tests 10-21, speed 57-60, quality 39-70, precision_speed 65-89, precision_train 194-308, distributed
  # 141-236 s; CPU seconds (user + system, in gpu_check.json): 12, 3, 21, 19, 26, 83, 80.
  LIMITS=(300 120 240 240)  # device, tests, speed, quality
  PRECISION_SPEED=(--tiny --steps 2 --warmup 1)
  PRECISION_TRAIN=(--steps 2 "${MICRO_LM[@]}")
  DISTRIBUTED=(--devices 2 --steps 1 --repeats 1 --skip-flops)
  LIMITS_PRECISION=(300 930 720)  # optimizer step, training step, distributed
else
  TESTS=(tests/test_quantization.py tests/test_linalg.py tests/test_factors.py tests/test_partition.py
         tests/test_shampoo.py tests/integration/test_failures.py tests/test_alias.py tests/test_state_utils.py
         tests/integration/test_optax_conventions.py tests/integration/test_stability.py tests/integration/test_distributed_step.py
         -k "not resume")
  SPEED=(--model-size small --steps 5 --repeats 3 --budget 3 --skip-peers --skip-profile --train-batches 16)
  QUALITY=(--examples transformer_lm cnn_digits --seeds 0 1 --steps 150)
  LIMITS=(90 170 90 70)  # device, tests, speed, quality: at most 7 minutes in all
  PRECISION_SPEED=(--steps 10 --warmup 2)
  PRECISION_TRAIN=(--steps 60)
  DISTRIBUTED=(--devices 1 --steps 2 --repeats 1 --skip-flops)
  LIMITS_PRECISION=(50 50 40)  # optimizer step, training step, distributed: 2.3 minutes (9.3 in all, one GPU)
fi

children_cpu() {  # sets CHILDREN_CPU: CPU seconds (user + system) of this shell's finished children so far
  times > "$OUT_DIR/.times"  # in this shell, not a subshell: a subshell's own children count from zero
  CHILDREN_CPU=$(awk 'NR == 2 { split($1, u, "m"); split($2, s, "m");
                              printf "%.1f", 60 * (u[1] + s[1]) + u[2] + s[2] }' "$OUT_DIR/.times")
}

stage() {  # stage NAME LIMIT_S COMMAND...: runs a stage with a time limit, records status, seconds, CPU s
  local name=$1 limit=$2; shift 2
  local start=$SECONDS cpu_start status
  children_cpu
  cpu_start=$CHILDREN_CPU
  echo "=== $name (limit ${limit}s): $*" >&2
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  status=$?
  tail -n 5 "$OUT_DIR/$name.log" >&2
  children_cpu
  local cpu_used
  cpu_used=$(awk -v a="$cpu_start" -v b="$CHILDREN_CPU" 'BEGIN { print b - a }')
  echo "$name $status $((SECONDS - start)) $cpu_used" >> "$STAGES"
}

missing() {  # prints the modules (arguments) that do not import
  "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}

# 1. The backend, and (on GPU) that a jitted update really runs there and matches the CPU's.
stage device "${LIMITS[0]}" "$PY" - "$OUT_DIR/device.json" "$CPU" <<'EOF'
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
import optax_shampoo4 as s4

out, cpu_only = sys.argv[1], sys.argv[2] == "1"
report = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "optax": optax.__version__}
if not cpu_only:
  assert jax.default_backend() == "gpu", f"expected the GPU backend, got {jax.default_backend()}"
rng = np.random.default_rng(0)
params = {"w": jnp.zeros((192, 96)), "v": jnp.zeros((64, 3, 3, 32)), "b": jnp.zeros(96)}
grads = [{k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()} for _ in range(4)]
for state_format in ("fp32", "eigen"):
  tx = s4.scale_by_shampoo4(state_format=state_format, stats_every=1, root_every=2, quant_block=32)
  outs = {}
  for where in ["default"] + ([] if cpu_only else ["cpu"]):
    device = jax.devices()[0] if where == "default" else jax.devices("cpu")[0]
    with jax.default_device(device):
      state, update = tx.init(params), jax.jit(tx.update)
      for g in grads:
        u, state = update(jax.device_put(g, device), state)
      u = jax.block_until_ready(u)
      assert all(device in leaf.devices() for leaf in jax.tree.leaves(u)), "update ran elsewhere"
      assert int(state.failed_refreshes) == 0 and all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
      outs[where] = {k: np.asarray(v) for k, v in u.items()}
  if "cpu" in outs:
    diff = max(float(np.max(np.abs(outs["default"][k] - outs["cpu"][k])) / np.max(np.abs(outs["cpu"][k])))
               for k in outs["cpu"])
    report[f"{state_format}_gpu_vs_cpu_max_rel_diff"] = diff
    if state_format == "fp32":  # eigen: 4-bit codes may round differently; recorded, not asserted
      assert diff < 1e-3, f"fp32 update on GPU differs from CPU by {diff:.2e}"
json.dump(report, open(out, "w"), indent=1)
print(json.dumps(report))
EOF

# 2. The fast tests (on the default device: the GPU, or the CPU with --cpu).
stage tests "${LIMITS[1]}" "$PY" -m pytest -q -x -p no:cacheprovider -o addopts="" -m "not slow" \
  --junitxml="$OUT_DIR/tests.xml" "${TESTS[@]}"

# 3. Speed at reduced size (no peers, no profile).
stage speed "${LIMITS[2]}" "$PY" benchmarks/speed.py "${SPEED[@]}" --out "$OUT_DIR/speed.json" --png ""

# 4. Quality at reduced size (the examples need flax and tqdm; cnn_digits also scikit-learn).
absent=$(missing flax tqdm)
if [ -n "$absent" ]; then
  echo "quality skipped: $absent" >> "$STAGES"
else
  # QUALITY last: its --extra takes every later argument
  stage quality "${LIMITS[3]}" "$PY" benchmarks/quality.py --out-dir "$OUT_DIR" --runs-dir "$OUT_DIR/runs" \
    "${QUALITY[@]}"
fi

# 5. Precision of the per-step products: the optimizer step (GPT-2 124M shapes; --tiny: a small tree) and
# the transformer example's training step (train_time_s includes the first step's compilation), each
# precision against optax.adamw.
stage precision_speed "${LIMITS_PRECISION[0]}" "$PY" benchmarks/precision_speed.py "${PRECISION_SPEED[@]}" \
  --out "$OUT_DIR/precision_speed.json"
absent=$(missing flax tqdm)
if [ -n "$absent" ]; then
  echo "precision_train skipped: $absent" >> "$STAGES"
else
  stage precision_train "${LIMITS_PRECISION[1]}" "$PY" examples/transformer_lm.py "${PRECISION_TRAIN[@]}" \
    --out "$OUT_DIR/precision_train.json" --optimizers adamw adamw+shampoo4 adamw+shampoo4_bf16x3 \
    adamw+shampoo4_bf16 soap4 soap4_bf16x3 soap4_bf16
fi

# 6. The multi-device path (benchmarks/distributed.py, small), with the caller's XLA flags.
stage distributed "${LIMITS_PRECISION[2]}" env XLA_FLAGS="$XLA_FLAGS_IN" "$PY" benchmarks/distributed.py \
  "${DISTRIBUTED[@]}" \
  --out "$OUT_DIR/distributed.json"

"$PY" - "$STAGES" "$OUT_DIR/gpu_check.json" "$CPU" "$SIZE" <<'EOF'
import json, sys
stages = {}
for line in open(sys.argv[1]):
  name, status, *rest = line.split()
  if status == "skipped:":
    stages[name] = {"status": "skipped", "missing": rest}
  else:
    code = int(status)
    stages[name] = {"status": "ok" if code == 0 else ("timeout" if code == 124 else "failed"),
                    "exit_code": code, "seconds": int(rest[0]), "cpu_seconds": float(rest[1])}
summary = {"cpu_mode": sys.argv[3] == "1", "size": sys.argv[4], "stages": stages,
           "total_seconds": sum(s.get("seconds", 0) for s in stages.values()),
           "total_cpu_seconds": round(sum(s.get("cpu_seconds", 0.0) for s in stages.values()), 1)}
json.dump(summary, open(sys.argv[2], "w"), indent=1)
print(json.dumps(summary, indent=1))
sys.exit(0 if all(s["status"] in ("ok", "skipped") for s in stages.values()) else 1)
EOF
