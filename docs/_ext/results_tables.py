"""Tables (MyST markdown) and plots (PNG) made from ``benchmarks/results/*.json`` at documentation build time.

Every number on the results pages and in the optimizer-choice table comes from here: the pages include the
generated files, so a rerun benchmark changes the site at the next build. Each ``write_*`` function reads one
JSON file and writes ``<name>.md`` (and ``<name>.png``) into the output folder.
"""

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EXAMPLES = ("cnn_digits", "transformer_lm", "autoencoder_mnist")
MIB = 2.0**20


def load_json(results_dir, name):
  """The parsed JSON file ``name`` of the results folder."""
  return json.loads((pathlib.Path(results_dir) / name).read_text())


def markdown_table(header, rows, align=None):
  """A MyST markdown table; by default the first column left-aligned, the others right-aligned."""
  align = align or ["---"] + ["---:"] * (len(header) - 1)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def _num(value, digits=4):
  if value is None:
    return "—"
  if abs(value) >= 100:
    return f"{value:.2f}"
  return f"{value:.{digits}g}"


def _pct(value):
  return f"{100 * value:+.1f} %"


def _reference_name(names, suffix):
  matches = [name for name in names if name.endswith(suffix)]
  return matches[0] if matches else None


def _mean_and_spread(stats):
  """``mean ± half the range``, the spread with as many decimals as the mean."""
  mean, half = stats["mean"], (stats["max"] - stats["min"]) / 2
  decimals = max(0, 3 - int(f"{abs(mean):e}".split("e")[1]))
  return f"{mean:.{decimals}f} ± {half:.{decimals}f}"


def quality_rows(runs, reference_suffix):
  """Rows ``optimizer, final training loss (mean ± half the range over seeds), gap of the mean to the reference
  optimizer's (the one whose name ends with reference_suffix), held-out loss`` of one example."""
  reference = _reference_name(runs, reference_suffix)
  rows = []
  for name, run in runs.items():
    loss = run["final_train_loss"]
    gap = "" if reference in (None, name) else _pct(loss["mean"] / runs[reference]["final_train_loss"]["mean"] - 1)
    rows.append([f"`{name}`", _mean_and_spread(loss), gap, _num(run["loss"]["mean"]),
                 f"{run['state_bytes'] / MIB:.2f}" if "state_bytes" in run else "—"])
  return rows


def plot_quality(summary, path, title):
  """Final training loss of every optimizer relative to each example's first optimizer (its baseline): the mean
  over seeds as a dot, the seeds' range as error bars."""
  fig, axes = plt.subplots(1, len(EXAMPLES), figsize=(4.2 * len(EXAMPLES), 3.8))
  for ax, example in zip(axes, EXAMPLES):
    runs = summary.get(example, {})
    if not runs:
      continue
    base = next(iter(runs.values()))["final_train_loss"]["mean"]
    names = list(runs)
    means = [runs[n]["final_train_loss"]["mean"] / base for n in names]
    lows = [m - runs[n]["final_train_loss"]["min"] / base for m, n in zip(means, names)]
    highs = [runs[n]["final_train_loss"]["max"] / base - m for m, n in zip(means, names)]
    ax.errorbar(means, range(len(names)), xerr=[lows, highs], fmt="o", color="tab:blue", capsize=3)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_title(example, fontsize=10)
    ax.set_xlabel("final training loss / first row's mean")
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_quality(results_dir, out_dir, name, reference_suffix, title):
  data = load_json(results_dir, f"{name}.json")
  summary, seeds = data["summary"], data["settings"].get("seeds", [])
  text = ""
  for example in EXAMPLES:
    if example not in summary:
      continue
    text += (f"\n**`{example}.py`**: final training loss, mean ± half the range over seeds "
             f"{', '.join(map(str, seeds))}; gap of the mean to `*{reference_suffix}`; held-out loss (mean):\n\n")
    text += markdown_table(["optimizer", "final training loss", f"vs `*{reference_suffix}`", "held-out loss",
                    "state MiB"], quality_rows(summary[example], reference_suffix))
  (out_dir / f"{name}.md").write_text(text)
  plot_quality(summary, out_dir / f"{name}.png", title)


def speed_rows(data):
  rows = []
  for name, row in data["rows"].items():
    stats = row.get("refresh_stats_ms", row.get("refresh_ms"))
    compile_s = data.get("compile_s", {}).get(name, {}).get("plain")
    rows.append([
        f"`{name}`", f"{_num(row['plain_ms'], 3)} ms", f"{row['plain_vs_adamw']:.1f}×",
        f"{row['amortized_vs_adamw']:.1f}×" if "amortized_vs_adamw" in row else "—",
        f"{row['refresh_step_vs_adamw']:.0f}×" if "refresh_step_vs_adamw" in row else "—",
        f"{stats:.0f} ms" if stats is not None else "—",
        f"{row['refresh_root_ms']:.0f} ms" if row.get("refresh_root_ms") is not None else "—",
        f"{compile_s:.1f} s" if compile_s is not None else "—"])
  return rows


def plot_speed(data, path):
  names = list(data["rows"])
  plain = [data["rows"][n]["plain_vs_adamw"] for n in names]
  amortized = [data["rows"][n].get("amortized_vs_adamw", float("nan")) for n in names]
  fig, ax = plt.subplots(figsize=(8, 0.3 * len(names) + 1.2))
  ys = range(len(names))
  ax.barh([y - 0.2 for y in ys], plain, height=0.4, label="plain step")
  ax.barh([y + 0.2 for y in ys], amortized, height=0.4, label="amortized step")
  ax.set_yticks(list(ys), names, fontsize=8)
  ax.invert_yaxis()
  ax.set_xscale("log")
  ax.set_xlabel("optimizer step time / optax.adamw's (log scale)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_speed(results_dir, out_dir):
  data = load_json(results_dir, "speed.json")
  settings = data["settings"]
  text = (f"Optimizer step alone on a {settings['params']:,}-parameter decoder; *plain*: a step without refresh, "
          f"*amortized*: plain + statistics refresh / {settings['T1']} + root refresh / {settings['T2']} "
          f"(`amortized_rule` in the JSON); ratios to `optax.adamw`'s median step of the same run. Backend: "
          f"{data['environment']['backend']}, {data.get('note', '')}.\n\n")
  header = ["optimizer", "plain step", "plain", "amortized", "refresh step", "stats refresh", "root refresh",
            "compile"]
  text += markdown_table(header, speed_rows(data))
  train = data.get("train_step", {}).get("rows", {})
  if train:
    text += "\nWhole training step (forward, backward, update) on real batches, ratio to AdamW's:\n\n"
    rows = [[f"`{row['optimizer']}`", row["batch"], f"{_num(row['plain_ms'], 3)} ms", f"{row['plain_vs_adamw']:.2f}×",
             f"{row['amortized_vs_adamw']:.2f}×"] for row in train.values()]
    text += markdown_table(["optimizer", "batch", "plain step", "plain", "amortized"], rows)
  (out_dir / "speed.md").write_text(text)
  plot_speed(data, out_dir / "speed.png")


MODEL_LABELS = {"gpt2_124m": "GPT-2 124M", "llama_130m": "LLaMA-130M", "llama_350m": "LLaMA-350M",
                "llama_7b": "LLaMA-7B", "vit_s16": "ViT-S/16", "resnet34": "ResNet-34", "swin_t": "Swin-T"}


def _model_label(key):
  return MODEL_LABELS.get(key, key)


def memory_tables(data):
  models = data["models"]
  states = list(next(iter(models.values()))["states"])
  rows = [[_model_label(key), model["max_order"]] + [f"{model['states'][s]['total'] / MIB:.1f}" for s in states]
          + [f"{model['ratios'][states[3]]['fp32_precond_over_precond']:.2f}×"]
          for key, model in models.items()]
  header = ["model", "max order"] + [f"{s} MiB" for s in states] + ["32-bit / 4-bit preconditioner"]
  text = "Whole optimizer state with fp32 moments:\n\n" + markdown_table(header, rows)
  kinds = list(next(iter(models.values()))["moment_bits_vs_adamw"])
  rows = [[_model_label(key)] + [" / ".join(f"{model['moment_bits_vs_adamw'][k][b]:.3f}" for b in ("None", "8", "4"))
                                 for k in kinds] for key, model in models.items()]
  text += ("\nWhole optimizer state / `optax.adamw`'s, by `moment_bits` (None / 8 / 4):\n\n"
           + markdown_table(["model"] + kinds, rows, ["---"] * (len(kinds) + 1)))
  return text


def plot_memory(data, path):
  models = data["models"]
  states = list(next(iter(models.values()))["states"])
  fig, ax = plt.subplots(figsize=(9, 3.8))
  width = 0.8 / len(states)
  for i, state in enumerate(states):
    values = [model["states"][state]["total"] / model["states"][states[0]]["total"] for model in models.values()]
    ax.bar([x + i * width for x in range(len(models))], values, width=width, label=state)
  ax.set_xticks([x + 0.4 - width / 2 for x in range(len(models))], [_model_label(k) for k in models], fontsize=8)
  ax.set_ylabel("optimizer state / AdamW's")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_memory(results_dir, out_dir):
  data = load_json(results_dir, "memory.json")
  (out_dir / "memory.md").write_text(memory_tables(data))
  plot_memory(data, out_dir / "memory.png")


def _step_flops_text(flops):
  """The every-step L̂GR̂ flops table (the products split over the devices by a static schedule), if measured."""
  if not flops:
    return ""
  rows = [[n, f"{r['dot_flops_per_device'] / 1e9:.1f}", f"{r['vs_1_device']:.3f}", f"{1 / int(n):.3f}",
           f"{r['balance']:.3f}"] for n, r in flops["rows"].items()]
  return (f"\nMatrix-product flops per device of the every-step preconditioning, {_model_label(flops['model'])} "
          f"(counted in the compiled {flops['program']} program):\n\n"
          + markdown_table(["devices", "GFLOP per device", "of 1 device", "ideal 1/N", "schedule balance"], rows))


def _stats_flops_text(stats_flops):
  """The statistics-step flops table (each device forms and refreshes only its own factors), if measured."""
  if not stats_flops:
    return ""
  rows = [[n, f"{r['dot_flops_per_device'] / 1e9:.1f}", f"{r['vs_1_device']:.3f}", f"{1 / int(n):.3f}"]
          for n, r in stats_flops["rows"].items()]
  return (f"\nMatrix-product flops per device of a statistics step, {_model_label(stats_flops['model'])} "
          f"(counted in the compiled {stats_flops['program']}; Gram matrices formed by the factors' owners):\n\n"
          + markdown_table(["devices", "GFLOP per device", "of 1 device", "ideal 1/N"], rows))


def _soap_flops_text(soap_flops):
  """SOAP's per-device update flops (plain step, refresh branch), if measured."""
  if not soap_flops:
    return ""
  rows = [[n, f"{r['every_step_flops_per_device'] / 1e9:.1f}", f"{r['every_step_vs_1_device']:.3f}",
           f"{1 / int(n):.3f}", f"{r['refresh_flops_per_device'] / 1e9:.1f}",
           f"{r['temp_bytes_per_device'] / MIB:.0f}"] for n, r in soap_flops["rows"].items()]
  return (f"\nMatrix-product flops per device of {soap_flops['optimizer']}'s compiled update, "
          f"{_model_label(soap_flops['model'])} (a plain step: outside the refresh's conditional):\n\n"
          + markdown_table(["devices", "plain step GFLOP per device", "of 1 device", "ideal 1/N",
                            "refresh branch GFLOP", "XLA scratch MiB per device"], rows))


def _fsdp_memory_text(fsdp_memory):
  """The FSDP train-state table (parameters and optimizer state split over N devices), if measured."""
  if not fsdp_memory:
    return ""
  rows = [[n, f"{r['params_per_device'] / MIB:.1f}", f"{r['opt_state_per_device'] / MIB:.1f}",
           f"{r['train_state_per_device'] / MIB:.1f}", f"{r['vs_even_split']:.4f}"]
          for n, r in fsdp_memory["rows"].items()]
  return (f"\nFSDP: the whole train state per device, {_model_label(fsdp_memory['model'])}, "
          f"{fsdp_memory['optimizer']} ({fsdp_memory['layout']}; exact, from each leaf's shard shape):\n\n"
          + markdown_table(["devices", "params MiB", "optimizer state MiB", "train state MiB", "of total / N"], rows))


def write_distributed(results_dir, out_dir):
  data = load_json(results_dir, "distributed.json")
  memory, timing = data["memory"], data["timing"]
  rows = [[n, f"{r['factors_per_device'] / MIB:.1f}", f"{r['factors_fraction_of_1_device']:.3f}",
           f"{r['ideal_fraction']:.3f}", f"{r['rest_per_device'] / MIB:.1f}"] for n, r in memory["rows"].items()]
  text = (f"Per-device bytes, {_model_label(memory['model'])} (exact, from each leaf's shard shape):\n\n"
          + markdown_table(["devices", "4-bit factors per device MiB", "of 1 device", "ideal 1/N", "rest per device MiB"],
                   rows))
  rows = [[n, f"{r['refresh_ms']:.0f} ms", f"{r['refresh_vs_1_device']:.2f}", f"{r['plain_ms']:.0f} ms",
           f"{r['plain_vs_1_device']:.2f}"] for n, r in timing["rows"].items()]
  env = data["environment"]
  text += (f"\nStep times, {timing['model']}, {env['device_count']} virtual {env['backend']} devices on "
           f"{env['cpu_count']} cores (how the work divides, not a speed-up):\n\n"
           + markdown_table(["devices", "refresh step", "of 1 device", "plain step", "of 1 device"], rows))
  text += _step_flops_text(data.get("flops"))
  text += _stats_flops_text(data.get("stats_flops"))
  text += _soap_flops_text(data.get("soap_flops"))
  text += _fsdp_memory_text(data.get("fsdp_memory"))
  (out_dir / "distributed.md").write_text(text)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ns = [int(n) for n in memory["rows"]]
  ax.loglog(ns, [r["factors_fraction_of_1_device"] for r in memory["rows"].values()], "o-", label="measured")
  ax.loglog(ns, [1 / n for n in ns], "--", color="gray", label="1/N")
  ax.set_xticks(ns, [str(n) for n in ns])
  ax.set_xlabel("devices")
  ax.set_ylabel("factor bytes per device / 1 device's")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_dir / "distributed.png", dpi=110)
  plt.close(fig)


def write_quant_error(results_dir, out_dir):
  data = load_json(results_dir, "quant_error.json")
  paper = data["paper"]["table5"]["Linear-2"]
  real = data["results"]["real"]["modes"]["Linear-2/4bit/block64"]
  synthetic = data["results"]["A2"]["modes"]["Linear-2/4bit/block64"]
  rows = [[f"`{mode}`", f"{real[mode]['nre']:.4f}", f"{paper[mode][0]:.4f}", f"{synthetic[mode]['nre']:.4f}",
           f"{paper[mode][2]:.4f}"] for mode in paper if mode in real and mode in synthetic]
  text = ("Normalized error of $A^{-1/4}$, Linear-2 codebook, 4 bits, block 64 (paper: Table 5):\n\n"
          + markdown_table(["mode", "real statistic (ours)", "A1 (paper)", "synthetic A2 (ours)", "A2 (paper)"], rows))
  (out_dir / "quant_error.md").write_text(text)


# The configurations of the optimizer-choice table and where each benchmark file keeps them (names, no numbers):
# (label, memory entry of memory.json's GPT-2 model, speed.json row or (speed file, row), (quality file, optimizer)
# or None). SOAP's rows come from the run of its current code (the 16-/8-bit head tiers, the 4-bit rows projected
# inside the products), speed_soap_projected.json.
CHOICES = (
    ("`optax.adamw`", ("moment_bits", "adamw", "None"), "adamw", ("quality", "adamw")),
    ("AdamW, 8-bit moments (`s4.moments`)", ("moment_bits", "adamw", "8"), "adamw m8", None),
    ("AdamW + 32-bit Shampoo (`state_format=\"fp32\"`)", ("state", "adamw+shampoo32"), "ours fp32",
     ("quality", "adamw+shampoo32")),
    ("AdamW + 8-bit Shampoo (`bits=8`)", ("state", "adamw+shampoo8"), None,
     ("quality", "adamw+shampoo8")),
    ("**`s4.adamw_shampoo4`** (defaults)", ("moment_bits", "adamw+shampoo4", "None"), "ours eigen",
     ("quality", "adamw+shampoo4")),
    ("`s4.adamw_shampoo4(moment_bits=8)`", ("moment_bits", "adamw+shampoo4", "8"), "ours eigen m8",
     ("quality_variants", "adamw+shampoo4_m8")),
    ("`s4.adamw_shampoo4(moment_bits=8, store_root=False)`", ("moment_bits", "adamw+shampoo4_noroot", "8"),
     "ours eigen no root m8", None),
    ("`s4.adamw_shampoo4(bits=3)`", None, "ours eigen 3-bit", ("quality_variants", "adamw+shampoo3")),
    ("SOAP, fp32 eigenvectors (`state_format=\"fp32\"`)", None, ("speed_soap_projected", "soap32"), ("quality_soap", "soap32")),
    ("**`s4.soap4`** (defaults)", ("moment_bits", "soap4", "None"), ("speed_soap_projected", "soap4"), ("quality_soap", "soap4")),
    ("`s4.soap4(moment_bits=8)`", ("moment_bits", "soap4", "8"), ("speed_soap_projected", "soap4_m8"), None),
)
QUALITY_EXAMPLES = ("transformer_lm", "autoencoder_mnist")


def _memory_ratio(model, entry):
  if entry is None:
    return None
  if entry[0] == "moment_bits":
    return model["moment_bits_vs_adamw"][entry[1]][entry[2]]
  return model["states"][entry[1]]["total"] / model["states"]["adamw"]["total"]


def _quality_gap(quality, entry, example):
  if entry is None:
    return None
  runs = quality[entry[0]]["summary"].get(example, {})
  if entry[1] not in runs or "adamw" not in runs:
    return None
  return runs[entry[1]]["final_train_loss"]["mean"] / runs["adamw"]["final_train_loss"]["mean"] - 1


def write_choosing(results_dir, out_dir):
  """The optimizer-choice table: memory (GPT-2 124M shapes), amortized step cost and final training loss
  against AdamW on the two AdamW examples, each cell read from the benchmark files."""
  model = load_json(results_dir, "memory.json")["models"]["gpt2_124m"]
  speed_files = {"speed": load_json(results_dir, "speed.json")["rows"]}
  quality = {name: load_json(results_dir, f"{name}.json") for name in ("quality", "quality_variants", "quality_soap")}
  rows = []
  for label, memory_entry, speed_key, quality_entry in CHOICES:
    ratio = _memory_ratio(model, memory_entry)
    speed_file, speed_row = ("speed", speed_key) if isinstance(speed_key, str) or speed_key is None else speed_key
    if speed_file not in speed_files:
      speed_files[speed_file] = load_json(results_dir, f"{speed_file}.json")["rows"]
    step = speed_files[speed_file].get(speed_row, {}) if speed_row else {}
    step_ratio = step.get("amortized_vs_adamw", step.get("plain_vs_adamw"))
    gaps = [_quality_gap(quality, quality_entry, example) for example in QUALITY_EXAMPLES]
    rows.append([label, "—" if ratio is None else f"{ratio:.2f}×",
                 "—" if step_ratio is None else f"{step_ratio:.1f}×"]
                + ["—" if gap is None else _pct(gap) for gap in gaps])
  header = ["optimizer", "state memory vs AdamW (GPT-2 124M)", "optimizer step vs AdamW (amortized, CPU)"]
  header += [f"final loss vs AdamW, `{e}.py`" for e in QUALITY_EXAMPLES]
  (out_dir / "choosing.md").write_text(markdown_table(header, rows))


def write_soap_basis(results_dir, out_dir):
  """4-bit SOAP's basis variants on the CNN (``soap_basis.json``): final loss, mean over seeds, gap to fp32 SOAP."""
  data = load_json(results_dir, "soap_basis.json")
  rows = [[f"`{name}`", f"{stats['mean']:.4f}", _pct(stats["relative_gap"])] for name, stats in data["summary"].items()]
  text = (f"{data['example']}, seeds {', '.join(str(s) for s in data['seeds'])}; final training loss: "
          f"{data['final_train_loss']} (mean over seeds):\n\n"
          + markdown_table(["basis storage and rectification", "final training loss", "vs fp32 SOAP"], rows))
  (out_dir / "soap_basis.md").write_text(text)


def write_moment_store_parts(results_dir, out_dir):
  """The parts of re-quantizing a moment, two ways each (``moment_store_parts.json``): median times and ratio."""
  data = load_json(results_dir, "moment_store_parts.json")
  by_part = {}
  for row in data["rows"]:
    by_part.setdefault(row["part"], []).append(row)
  rows = []
  for part, alternatives in by_part.items():
    slowest = max(row["median_ms"] for row in alternatives)
    rows += [[part, f"`{row['alternative']}`", f"{row['median_ms']:.2f} ms", f"{slowest / row['median_ms']:.1f}×"]
             for row in alternatives]
  text = (f"{data['size']:,} values, median of {data['repeats']} calls, backend `{data['backend']}` "
          f"({data.get('cpu_count', '?')} CPU cores):\n\n"
          + markdown_table(["part", "implementation", "median time", "speed-up over the slower"], rows))
  (out_dir / "moment_store_parts.md").write_text(text)


ILLCOND_REFERENCE = "soap_ref"


def illcond_rows(problem):
  """Rows ``optimizer, best lr, metric (mean ± std over seeds), ratio to the reference SOAP's, largest stable lr``."""
  summary = problem["summary"]
  ref = summary.get(ILLCOND_REFERENCE, {}).get("best_mean")
  rows = []
  for name, s in summary.items():
    ratio = "—" if not ref else f"{s['best_mean'] / ref:.2f}×"
    edge = " (edge)" if s["best_at_edge"] else ""
    stable = "none" if s["largest_stable_lr"] is None else f"{s['largest_stable_lr']:.2g}"
    rows.append([f"`{name}`", f"{s['best_lr']:.2g}{edge}", f"{_num(s['best_mean'], 3)} ± {_num(s['best_std'], 2)}",
                 ratio, stable])
  return rows


def write_illcond(results_dir, out_dir):
  data = load_json(results_dir, "illcond.json")
  text = f"{data['steps']} steps, seeds {data['seeds']}; mean over seeds at each row's best learning rate.\n"
  for name, problem in data["problems"].items():
    text += f"\n**`{name}`** ({problem['metric']}):\n\n"
    text += markdown_table(["optimizer", "best lr", "mean ± std", "vs `soap_ref`", "largest stable lr"], illcond_rows(problem))
  (out_dir / "illcond.md").write_text(text)
  plot_illcond(data["problems"], out_dir / "illcond.png")


def plot_illcond(problems, path):
  """Per problem, each optimizer's metric (mean over seeds) against the learning rate, log-log."""
  cols = 4
  rows = -(-len(problems) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
  for ax, (name, problem) in zip(axes.flat, problems.items()):
    for row, s in problem["summary"].items():
      ax.loglog(s["lrs"], s["means"], ".-", label=row, linewidth=1)
    ax.set_title(name, fontsize=9)
    ax.tick_params(labelsize=7)
  for ax in list(axes.flat)[len(problems):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=6)
  fig.supxlabel("learning rate")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def precision_rows(data):
  """Rows ``task, method, precision, mean, spread, ratio to "highest"`` of ``benchmarks/precision.py``'s table."""
  rows = []
  for r in data["table"]:
    ratio = "—" if r["ratio"] is None else f"{r['ratio']:.4f}"
    rows.append([f"`{r['task']}`", r["method"], f"`{r['precision']}`", r.get("seeds", "—"), _num(r["mean"]),
                 _num(r["spread"], 2), ratio])
  return rows


def precision_summary(table):
  """One sentence per part: the largest change of each precision's mean from ``"highest"``, and the seeds run."""
  lines = []
  for part, label in (("examples", "Examples"), ("illcond", "Ill-conditioned problems")):
    part_rows = [r for r in table if r["part"] == part and r["ratio"] is not None]
    if not part_rows:
      continue
    largest = {p: max(abs(r["ratio"] - 1) for r in part_rows if r["precision"] == p) for p in ("high", "default")}
    seeds = sorted({r["seeds"] for r in part_rows})
    lines.append(f"{label} ({' or '.join(map(str, seeds))} seeds per row): largest change from `\"highest\"` "
                 f"{100 * largest['default']:.1f} % at `\"default\"`, {100 * largest['high']:.1f} % at `\"high\"`.")
  return "\n\n".join(lines) + "\n"


def write_precision(results_dir, out_dir):
  """``precision.md``: the per-step products' precision, quality table and (when present) the GPU timings."""
  data = load_json(results_dir, "precision.json")
  settings = data["settings"]
  text = (f"Examples: {settings.get('example_steps', '—')} steps, final training loss, spread = max - min over "
          f"the seeds run (column seeds); ill-conditioned problems ({settings.get('illcond_steps', '—')} steps): "
          "best learning rate's mean suboptimality (final loss for `mlp`), spread = standard deviation.\n\n")
  text += markdown_table(["task", "method", "precision", "seeds", "mean", "spread", "/ highest"], precision_rows(data),
                 ["---", "---", "---", "---:", "---:", "---:", "---:"])
  text += "\n" + precision_summary(data["table"])
  speed_path = pathlib.Path(results_dir) / "precision_speed.json"
  if speed_path.exists():
    speed = json.loads(speed_path.read_text())
    base = speed["results"]["adamw"]["median_s"]
    rows = [[name, f"{1e3 * r['median_s']:.2f}", f"{r['median_s'] / base:.2f}"]
            for name, r in speed["results"].items()]
    text += (f"\nOptimizer step, {speed['model']} shapes, {speed['device_kind']} ({speed['backend']}):\n\n"
             + markdown_table(["optimizer", "median ms", "/ adamw"], rows))
  (out_dir / "precision.md").write_text(text)


def write_all(results_dir, out_dir):
  """Writes every generated table and plot; returns the output folder."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  write_quality(results_dir, out_dir, "quality", "shampoo32", "Shampoo formats (3 examples)")
  write_quality(results_dir, out_dir, "quality_variants", "shampoo32", "Variants and quantized moments")
  write_quality(results_dir, out_dir, "quality_soap", "soap32", "4-bit SOAP")
  write_speed(results_dir, out_dir)
  write_memory(results_dir, out_dir)
  write_distributed(results_dir, out_dir)
  write_quant_error(results_dir, out_dir)
  write_illcond(results_dir, out_dir)
  write_choosing(results_dir, out_dir)
  write_soap_basis(results_dir, out_dir)
  write_moment_store_parts(results_dir, out_dir)
  write_precision(results_dir, out_dir)
  return out_dir
