"""Every adapter variant trained on the shapes task with the same step budget.

One ``train.py`` run per registered variant (``configs/xcomposer.yaml``, the same
preset, data, seed, steps, learning rate and trainable parts), each in its own
process, one after the other. Every variant goes on the preset's adapter targets
and on image rows only, sized by rank like the preset's PLoRA: r = 16, alpha = 16,
dropout 0.05 (MELoRA: n = 4 mini adapters of rank 16, the parameter count of one
LoRA of rank 16; fLoRA-Tucker: ranks [16, 16], its default scale 1). Names that
are aliases of one class (``bone`` for ``miss``) run once. Per-example variants
(``flora_batched``) are left out with the reason printed: ``MultimodalLM.forward``
never enters ``example_adapters``, so the trainer cannot run them.

From each run's ``metrics.jsonl``: the final ``eval_accuracy``, mean seconds per LM
step (samples per step / ``samples_per_s``, leaving out the alignment steps and the
first ``WARMUP_STEPS`` LM steps), and peak memory (max ``peak_mem_mb``, the
training process's ``ru_maxrss`` on CPU). Trainable adapter parameters are counted
on the built model (``build_model`` + ``adapter_parameters``).

Run:  .venv/bin/python benchmarks/adapters.py [--steps N] [--align-steps N] [--variants a,b]
          [--model models/x.yaml] [--eval-samples N] [--work DIR] [--resume WORK/TIME] [dotted.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _report import write_section

from mmadapt.adapters import ADAPTERS, adapter_parameters
from mmadapt.build import build_model
from mmadapt.config import load_config

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "configs/xcomposer.yaml"
SECTION = "## Adapters"
PLOT = ROOT / "benchmarks" / "adapters.png"
WARMUP_STEPS = 2  # first LM steps left out of the step time
SHARED = {"modalities": ["image"], "r": 16, "alpha": 16, "dropout": 0.05}
SIZED = {  # fields beyond SHARED that size a variant like the preset's PLoRA r = 16
    "melora": {"n": 4},  # n divides SmolLM2's 576/192/1536 and tiny's 64/32/128 widths
    "flora_tucker": {"ranks": [16, 16], "alpha": None},  # scales by `scale`, not alpha
    "allora": {"alpha": None, "dropout": None},  # no scale (alpha = r) and no dropout, by definition
    "flora_opt": {"alpha": None},  # the N(0, 1/r) projection sets the scale
}


def variant_specs(targets: list[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """One adapter entry per registered class, and the names left out with why."""
    specs, skipped, seen = {}, {}, {}
    for name, cls in ADAPTERS.items():
        if cls in seen:
            skipped[name] = f"an alias of {seen[cls]} (the same class): benchmarked as {seen[cls]}"
            continue
        seen[cls] = name
        if cls.per_example:
            skipped[name] = ("per-example: its delta needs example_adapters(model, index), which "
                             "MultimodalLM.forward and the trainer never set, so train.py cannot run it")
            continue
        entry = {"type": name, **SHARED, "targets": targets, **SIZED.get(name, {})}
        specs[name] = {key: value for key, value in entry.items() if value is not None}
    return specs, skipped


@dataclass
class Result:
    variant: str
    spec: dict
    eval_accuracy: float
    adapter_params: int
    step_s: float  # mean seconds per LM step
    steps_timed: int
    peak_mem_mb: float


def overrides(args: argparse.Namespace) -> list[str]:
    """Overrides every run shares (the step budget, timing rows each step, no mid-run checkpoints)."""
    chosen = [f"model={args.model}", "train.log_every=1", "train.save_every=0", "train.eval_every=0"]
    if args.steps is not None:
        chosen.append(f"train.max_steps={args.steps}")
    if args.align_steps is not None:
        chosen.append(f"train.align_steps={args.align_steps}")
    if args.eval_samples is not None:
        chosen.append(f"data.eval_samples={args.eval_samples}")
    return [*chosen, *args.overrides]


def count_adapter_parameters(common: list[str], spec: dict) -> int:
    model = build_model(load_config(ROOT / RECIPE, [*common, f"adapters={json.dumps([spec])}"]))
    return sum(p.numel() for p in adapter_parameters(model).values())


def stage_override(variant: str, zero_stage: int) -> list[str]:
    """The recipe's ZeRO stage, or the highest one the variant's method supports (LoRA-Pro: 0)."""
    supported = ADAPTERS[variant].zero_stages
    return [] if zero_stage in supported else [f"deepspeed.zero_stage={max(supported)}"]


def train(variant: str, spec: dict, common: list[str], out: Path) -> None:
    """Run train.py for one variant."""
    command = [sys.executable, "train.py", "--config", RECIPE, *common,
               f"adapters={json.dumps([spec])}", f"train.output_dir={out}"]
    env = {k: v for k, v in os.environ.items() if k != "RANK"}  # train.py sets up its own single process
    with open(out.parent / f"{variant}.log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = (out.parent / f"{variant}.log").read_text()[-3000:]
        raise SystemExit(f"{variant}: train.py failed ({done.returncode}):\n{tail}")


def summarize(variant: str, spec: dict, out: Path, params: int, samples_per_step: int) -> Result:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lm_steps = [row for row in rows if "samples_per_s" in row and "loss_align" not in row]
    timed = lm_steps[WARMUP_STEPS:] or lm_steps  # a smoke run may have no step past warm-up
    evals = [row for row in rows if "eval_accuracy" in row]
    return Result(
        variant=variant,
        spec=spec,
        eval_accuracy=evals[-1]["eval_accuracy"] if evals else float("nan"),
        adapter_params=params,
        step_s=statistics.fmean(samples_per_step / row["samples_per_s"] for row in timed),
        steps_timed=len(timed),
        peak_mem_mb=max(row["peak_mem_mb"] for row in rows if "peak_mem_mb" in row),
    )


def table(results: list[Result]) -> str:
    lines = ["| variant | eval accuracy | adapter params | s / step | peak memory (MB) |",
             "|---|---|---|---|---|"]
    for res in results:
        lines.append(f"| {res.variant} | {res.eval_accuracy:.3f} | {res.adapter_params:,} | {res.step_s:.3f} | "
                     f"{res.peak_mem_mb:.0f} |")
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("eval_accuracy", "final eval accuracy"), ("adapter_params", "trainable adapter parameters"),
              ("step_s", "seconds per LM step"), ("peak_mem_mb", "peak memory (MB)")]
    names = [res.variant for res in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 0.45 * len(results) + 1.5), sharey=True)
    for ax, (field, title) in zip(axes, panels):
        ax.barh(names, [getattr(res, field) for res in results], color="tab:blue")
        ax.set(title=title, xlim=(0, 1) if field == "eval_accuracy" else (0, None))
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def section(results: list[Result], skipped: dict[str, str], cfg, args: argparse.Namespace) -> str:
    train, data = cfg.train, cfg.data
    specs = "\n".join(
        f"- `{res.variant}`: `{json.dumps({k: v for k, v in res.spec.items() if k != 'targets'})}`"
        + "".join(f" (`{o}`: the method's ZeRO stages are {ADAPTERS[res.variant].zero_stages})"
                  for o in stage_override(res.variant, cfg.deepspeed.zero_stage))
        for res in results
    )
    left_out = "\n".join(f"- `{name}`: {why}" for name, why in skipped.items()) or "- none"
    return f"""{SECTION}

`benchmarks/adapters.py` trains every registered adapter variant with `train.py` on the shapes task
(`{RECIPE}`, preset `{args.model}`), one process per variant, one after the other: the same data,
seed ({train.seed}), {train.max_steps} steps ({train.align_steps} of them the alignment stage), batch
{train.batch_size} x {train.grad_accum} accumulation, lr {train.lr:g}, trainable parts {train.trainable},
DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}; eval on {data.eval_samples} samples of `{data.eval}` at the end.
Command: `.venv/bin/python benchmarks/adapters.py {' '.join(args.argv)}`.

Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}.
Every adapter fires on image rows only, on the preset's targets ({', '.join(results[0].spec['targets'])}),
sized by rank like the preset's PLoRA (r = 16):
{specs}

Left out:
{left_out}

Eval accuracy: the run's final `eval_accuracy` (every shape named with its colour). Adapter params:
parameters of the adapters alone (the projector and ViT train too, the same for every variant).
s / step: mean of samples per step / `samples_per_s` over the LM steps after the first {WARMUP_STEPS}.
Peak memory: the largest `peak_mem_mb` (on CPU the training process's `ru_maxrss`).

{table(results)}

![accuracy, parameters, step time and memory per adapter variant](benchmarks/{PLOT.name})
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps for every run (default: the recipe's)")
    parser.add_argument("--align-steps", type=int, default=None, help="train.align_steps (default: the recipe's)")
    parser.add_argument("--variants", default=None, help="comma-separated registry names (default: all)")
    parser.add_argument("--model", default="models/smollm2-vision.yaml", help="model preset")
    parser.add_argument("--eval-samples", type=int, default=None, help="data.eval_samples (default: the recipe's)")
    parser.add_argument("overrides", nargs="*", help="more dotted.key=value overrides for every run")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-adapters", help="folder for the runs")
    parser.add_argument("--resume", type=Path, default=None,
                        help="an earlier run folder (WORK/<time>): variants that finished there are not trained again")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    return args


def main() -> None:
    args = parse_args()
    common = overrides(args)
    cfg = load_config(ROOT / RECIPE, common)
    specs, skipped = variant_specs(cfg.adapters[0]["targets"])
    if args.variants:
        wanted = args.variants.split(",")
        unknown = [name for name in wanted if name not in ADAPTERS]
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; registered: {sorted(ADAPTERS)}")
        specs = {name: spec for name, spec in specs.items() if name in wanted}
        skipped = {name: why for name, why in skipped.items() if name in wanted}
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)
    work = args.resume or args.work / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    samples_per_step = cfg.train.batch_size * cfg.train.grad_accum
    results = []
    for variant, spec in specs.items():
        print(f"{variant} ...", flush=True)
        params = count_adapter_parameters(common, spec)
        if not (work / variant / "adapter" / "adapter_config.json").exists():
            train(variant, spec, [*common, *stage_override(variant, cfg.deepspeed.zero_stage)], work / variant)
        results.append(summarize(variant, spec, work / variant, params, samples_per_step))
        print(f"  accuracy {results[-1].eval_accuracy:.3f}, {params:,} adapter params, "
              f"{results[-1].step_s:.3f} s/step, {results[-1].peak_mem_mb:.0f} MB", flush=True)
    if not results:
        raise SystemExit("no variant left to run")
    print(table(results))
    plot(results, PLOT)
    write_section(SECTION, section(results, skipped, cfg, args), ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
