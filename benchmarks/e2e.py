"""End-to-end text-only LoRA SFT: mmadapt's trainer against Hugging Face Trainer + PEFT.

Three training runs on the same data, base weights, batch, sequence length, steps,
learning rate, LoRA rank/alpha/targets and CPU thread count, each in its own process:

  ours ZeRO-0   python train.py --config benchmarks/e2e_text_lora.yaml deepspeed.zero_stage=0
  ours ZeRO-2   the same with deepspeed.zero_stage=2
  HF + PEFT     transformers.Trainer on peft.get_peft_model(LoraConfig(...)), fp32, use_cpu,
                no eval, no saving, dataloader_num_workers=0 (this file, ``--hf-worker``)

The data is text-only ChatML conversations built from the captions of
``data/shapes/train.jsonl`` (three "rewrite in capitals" turns per record), kept only
at the most common token length, so no batch holds padding and every step of every
run trains on exactly ``batch * length`` tokens. Both sides measure a step the same
way: from fetching its batch to the end of the optimizer step; tokens/s counts
non-padding tokens, peak memory is ``ru_maxrss`` of the training process. The first
two steps of every run are warm-up and left out of tokens/s.

Run:  .venv/bin/python benchmarks/e2e.py [--steps N] [--batch-size B] [--repeats R] [--quick] [--write]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _report import write_section

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "benchmarks" / "e2e_text_lora.yaml"
CAPTIONS = ROOT / "data" / "shapes" / "train.jsonl"
SECTION = "## End-to-end text LoRA SFT"
WARMUP_STEPS = 2
ARMS = ("ours ZeRO-0", "ours ZeRO-2", "HF Trainer + PEFT")
MAX_RECORDS = 512
SAMPLE_S = 0.2  # how often the parent samples CPU use and metrics rows
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---- data ------------------------------------------------------------------------------
def conversations(turns: int = 3) -> list[dict]:
    """Text-only records in the DESIGN.md schema, deterministic, from the shapes captions."""
    captions = []
    with open(CAPTIONS) as f:
        for line in f:
            messages = json.loads(line)["messages"]
            captions.append(next(m["content"] for m in messages if m["role"] == "assistant"))
    records = []
    for start in range(0, len(captions) - turns + 1, turns):
        messages = []
        for caption in captions[start : start + turns]:
            messages += [
                {"role": "user", "content": f"Rewrite in capital letters: {caption}"},
                {"role": "assistant", "content": caption.upper()},
            ]
        records.append({"id": f"text-{start // turns:05d}", "messages": messages, "images": [], "audios": []})
    return records


@dataclass
class Prepared:
    """Files every run reads: the JSONL for ours, the token rows and base model for HF."""

    data: Path  # DESIGN.md schema, for train.py
    tokens: Path  # {"input_ids", "labels"} rows, the same ids our tokenizer makes, for HF
    model_dir: str  # from_pretrained folder of the base LLM (the same weights ours loads)
    pad_id: int
    length: int  # tokens per sample
    count: int  # samples kept
    hf: dict = field(default_factory=dict)  # LoRA and optimizer settings read from the recipe


def prepare(work: Path, overrides: list[str]) -> Prepared:
    """Tokenize the conversations as train.py will, keep one length, save what HF needs."""
    from mmadapt.config import load_config
    from mmadapt.data.tokenize import encode_conversation
    from mmadapt.llm import load_llm

    cfg = load_config(RECIPE, overrides)
    loaded = load_llm(cfg.model.llm, seed=cfg.train.seed)  # build_model loads it with the same seed
    if loaded.pretrained_source is None:  # random weights: hand HF the very same tensors
        model_dir = str(work / "base")
        loaded.model.save_pretrained(model_dir)
    else:
        model_dir = loaded.model.name_or_path
    encoded = []
    for record in conversations():
        ids = encode_conversation(loaded.tokenizer, record["messages"], 0, cfg.data.system_prompt)
        encoded.append((record, ids))
    length = collections.Counter(len(ids["input_ids"]) for _, ids in encoded).most_common(1)[0][0]
    kept = [(record, ids) for record, ids in encoded if len(ids["input_ids"]) == length][:MAX_RECORDS]
    data, tokens = work / "data.jsonl", work / "tokens.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record, _ in kept))
    tokens.write_text("".join(json.dumps(ids) + "\n" for _, ids in kept))
    (spec,) = cfg.adapters
    train = cfg.train
    hf = {
        "targets": spec["targets"], "r": spec["r"], "alpha": spec["alpha"], "lr": train.lr,
        "weight_decay": train.weight_decay, "max_grad_norm": train.max_grad_norm, "seed": train.seed,
        "attn": cfg.model.llm.attn_implementation,
    }
    if train.warmup_steps or train.min_lr_ratio != 1.0 or spec.get("dropout", 0.0):
        raise SystemExit(f"{RECIPE} must keep a constant lr and no dropout to match the HF run")
    return Prepared(data, tokens, model_dir, loaded.tokenizer.pad_token_id, length, len(kept), hf)


# ---- the Hugging Face side (runs in its own process; imports nothing from mmadapt) -------
def hf_worker(spec_path: str) -> None:
    """Train with transformers.Trainer + PEFT as ``spec`` says; write metrics.jsonl rows."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    rows = [json.loads(line) for line in Path(spec["tokens"]).read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation=spec["attn"])
    lora = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules=spec["targets"],
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    pad_id = spec["pad_id"]

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        pad = lambda row, value: row + [value] * (width - len(row))  # noqa: E731
        return {
            "input_ids": torch.tensor([pad(item["input_ids"], pad_id) for item in items]),  # (B, T)
            "attention_mask": torch.tensor([pad([1] * len(item["input_ids"]), 0) for item in items]),  # (B, T)
            "labels": torch.tensor([pad(item["labels"], -100) for item in items]),  # (B, T)
        }

    class TimedTrainer(Trainer):
        """Starts a step's clock where ours does: before its batch is fetched."""

        def get_batch_samples(self, *args, **kwargs):
            self.step_started = time.perf_counter()
            batches, n_items = super().get_batch_samples(*args, **kwargs)
            self.step_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            self.step_samples = sum(len(b["input_ids"]) for b in batches)
            return batches, n_items

    metrics_file = Path(spec["out"]) / "metrics.jsonl"

    class Meter(TrainerCallback):
        """Appends one metrics.jsonl row per step as it ends, like our trainer (the parent watches the file)."""

        pending: dict | None = None

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - trainer.step_started
            self.flush()
            self.pending = {
                "step": state.global_step,
                "tokens_per_s": trainer.step_tokens / seconds,
                "samples_per_s": trainer.step_samples / seconds,
                "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and self.pending and self.pending["step"] == state.global_step:
                self.pending["loss"] = logs["loss"]
                self.flush()

        def on_train_end(self, args, state, control, **kwargs):
            self.flush()

        def flush(self) -> None:
            if self.pending is not None:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(self.pending) + "\n")
                self.pending = None

    args = TrainingArguments(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=spec["weight_decay"],
        max_grad_norm=spec["max_grad_norm"], seed=spec["seed"], logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, bf16=False, fp16=False,
        remove_unused_columns=False,
    )
    trainer = TimedTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[Meter()])
    trainer.train()


# ---- running the three arms ------------------------------------------------------------
@dataclass
class Run:
    arm: str
    rows: list[dict]  # metrics.jsonl train rows
    wall_s: float  # the whole process: imports, model load, training, saving
    other_cores: float = 0.0  # CPU cores other processes kept busy during the run, on average

    @property
    def timed(self) -> list[dict]:
        return [row for row in self.rows if row["step"] > WARMUP_STEPS]

    @property
    def clean(self) -> list[dict]:
        """Timed steps that no other process competed with."""
        return [row for row in self.timed if not row["contended"]]


def child_env(threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)  # train.py sets up its own single process
    return env


def run_process(command: list[str], out: Path, threads: int) -> Monitor:
    """Run ``command`` to completion while a :class:`Monitor` watches the machine and ``out/metrics.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, env=child_env(threads), stdout=log, stderr=subprocess.STDOUT)
        monitor = Monitor(child.pid, out / "metrics.jsonl")
        while child.poll() is None:
            monitor.sample()
            time.sleep(SAMPLE_S)
        monitor.sample()
    if child.returncode:
        tail = (out.parent / f"{out.name}.log").read_text()[-3000:]
        raise SystemExit(f"{' '.join(command)} failed ({child.returncode}):\n{tail}")
    return monitor


class Monitor:
    """Samples, while a run lasts, the CPU time other processes use and when each metrics row appears.

    Other processes' CPU = every core's busy time (``/proc/stat``) minus this process and the
    run's whole process tree. A step overlapped by other work is "contended".
    """

    def __init__(self, pid: int, metrics: Path) -> None:
        self.pid, self.metrics = pid, metrics
        self.times: list[float] = []
        self.others: list[float] = []  # cumulative CPU seconds of other processes
        self.row_times: list[float] = []  # when each metrics row was first seen
        self.start = time.perf_counter()

    def sample(self) -> None:
        now = time.perf_counter()
        ours = self_and_children_cpu_s() + tree_cpu_s(self.pid)
        self.times.append(now)
        self.others.append(machine_busy_s() - ours)
        if self.metrics.exists():
            rows = self.metrics.read_text().count("\n")
            self.row_times += [now] * (rows - len(self.row_times))

    @property
    def wall_s(self) -> float:
        return self.times[-1] - self.start

    def other_cores(self, begin: float, end: float) -> float:
        """Average cores other processes kept busy between two ``perf_counter`` times."""
        lo, hi = self._at(begin), self._at(end)
        return max(0.0, (hi - lo) / max(end - begin, 1e-9))

    def _at(self, t: float) -> float:
        """Cumulative other-process CPU at time ``t``, interpolated between samples."""
        i = bisect.bisect_left(self.times, t)
        if i == 0:
            return self.others[0]
        if i == len(self.times):
            return self.others[-1]
        t0, t1, v0, v1 = self.times[i - 1], self.times[i], self.others[i - 1], self.others[i]
        return v0 + (v1 - v0) * (t - t0) / max(t1 - t0, 1e-9)

    def annotate(self, rows: list[dict], batch_size: int, contended_above: float) -> None:
        """Give each row ``other_cores`` over its step's time span and a ``contended`` flag."""
        for row, seen in zip(rows, self.row_times, strict=True):
            seconds = batch_size / row["samples_per_s"]  # one micro-batch per step, one rank
            row["other_cores"] = self.other_cores(seen - seconds, seen)
            row["contended"] = row["other_cores"] > contended_above


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (``/proc/stat``)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def self_and_children_cpu_s() -> float:
    """CPU seconds of this process and of its finished, reaped children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def tree_cpu_s(root: int) -> float:
    """CPU seconds of the live process ``root`` and its live descendants (with their reaped children)."""
    parents, cpu = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # exited meanwhile
            continue
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = sum(int(v) for v in fields[11:15]) / CLOCK_TICKS  # utime stime cutime cstime
    tree, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        if pid in cpu and pid not in tree:
            tree.add(pid)
            frontier += [child for child, parent in parents.items() if parent == pid]
    return sum(cpu[pid] for pid in tree)


def run_ours(zero: int, out: Path, prepared: Prepared, args: argparse.Namespace) -> Run:
    command = [sys.executable, "train.py", "--config", str(RECIPE.relative_to(ROOT)), *args.overrides,
               f"data.train={prepared.data}", f"train.output_dir={out}", f"deepspeed.zero_stage={zero}"]
    monitor = run_process(command, out, args.threads)  # out is empty: train.py refuses a used folder
    return finished_run(f"ours ZeRO-{zero}", out, monitor, args)


def run_hf(out: Path, prepared: Prepared, args: argparse.Namespace) -> Run:
    spec = {**prepared.hf, "tokens": str(prepared.tokens), "model": prepared.model_dir, "pad_id": prepared.pad_id,
            "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads, "out": str(out)}
    spec_path = out.parent / "hf_spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    command = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", str(spec_path)]
    monitor = run_process(command, out, args.threads)
    return finished_run("HF Trainer + PEFT", out, monitor, args)


def finished_run(arm: str, out: Path, monitor: Monitor, args: argparse.Namespace) -> Run:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    monitor.annotate(rows, args.batch_size, args.contended_above)
    others = monitor.other_cores(monitor.start, monitor.times[-1])
    return Run(arm, [row for row in rows if "tokens_per_s" in row], monitor.wall_s, others)


def run_all(prepared: Prepared, work: Path, args: argparse.Namespace) -> list[Run]:
    """Every arm once per repetition, the order rotated by one each repetition."""
    runs = []
    for rep in range(args.repeats):
        order = ARMS[rep % len(ARMS) :] + ARMS[: rep % len(ARMS)]
        for arm in order:
            out = work / f"{arm.split()[0].lower()}{arm.split()[-1].lower()}-rep{rep}"
            out.mkdir(parents=True)
            print(f"[rep {rep + 1}/{args.repeats}] {arm} ...", flush=True)
            if arm == "HF Trainer + PEFT":
                run = run_hf(out, prepared, args)
            else:
                run = run_ours(int(arm[-1]), out, prepared, args)
            check_tokens(run, prepared, args)
            runs.append(run)
            clean = f"{median_tokens_per_s(run.clean):8.1f}" if run.clean else "     n/a"
            print(f"  {clean} tokens/s on {len(run.clean)}/{len(run.timed)} uncontended steps "
                  f"({median_tokens_per_s(run.timed):.1f} on all)  {max_mem(run):5.0f} MB  {run.wall_s:5.1f} s process"
                  f"  (other processes: {run.other_cores:.2f} cores)", flush=True)
    return runs


def check_tokens(run: Run, prepared: Prepared, args: argparse.Namespace) -> None:
    """Both sides must train on batch * length non-padding tokens per step, every step."""
    if len(run.rows) != args.steps:
        raise SystemExit(f"{run.arm}: {len(run.rows)} metric rows, expected {args.steps}")
    for row in run.rows:
        per_sample = row["tokens_per_s"] / row["samples_per_s"]
        if abs(per_sample - prepared.length) > 1e-6 * prepared.length:
            raise SystemExit(f"{run.arm} step {row['step']}: {per_sample:.2f} tokens/sample, "
                             f"expected {prepared.length}")


# ---- results ---------------------------------------------------------------------------
def median_tokens_per_s(rows: list[dict]) -> float:
    return statistics.median(row["tokens_per_s"] for row in rows)


def max_mem(run: Run) -> float:
    return max(row["peak_mem_mb"] for row in run.rows)


@dataclass
class Summary:
    arm: str
    clean: int  # uncontended timed steps
    timed: int
    tps_median: float  # over uncontended timed steps (nan if none)
    tps_q1: float
    tps_q3: float
    tps_all: float  # median over every timed step
    peak_mb: float
    final_loss: float
    wall_s: float


def summarize(runs: list[Run]) -> list[Summary]:
    """Per arm: tokens/s over the timed steps of every repetition; the largest peak RSS."""
    out = []
    for arm in ARMS:
        mine = [run for run in runs if run.arm == arm]
        clean = [row["tokens_per_s"] for run in mine for row in run.clean]
        timed = [row["tokens_per_s"] for run in mine for row in run.timed]
        q1, median, q3 = quartiles(clean)
        losses = [run.rows[-1].get("loss", float("nan")) for run in mine]
        out.append(Summary(arm, len(clean), len(timed), median, q1, q3, statistics.median(timed),
                           max(max_mem(run) for run in mine), statistics.median(losses),
                           statistics.median(run.wall_s for run in mine)))
    return out


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return (values * 3)[:3] if values else (math.nan,) * 3
    return tuple(statistics.quantiles(values, n=4, method="inclusive"))


def enough(s: Summary) -> bool:
    """Enough uncontended steps to compare (at least 5, or every timed step of a short run)."""
    return s.clean >= min(5, s.timed)


def table(summaries: list[Summary]) -> str:
    hf = summaries[-1]
    lines = [
        "| stack | tokens/s, median [IQR], uncontended steps | steps used | tokens/s, all steps | peak RSS (MB) "
        "| tokens/s ours/HF | memory ours/HF | final loss | process wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        ratio = "—" if s is hf else "n/a" if not (s.clean and hf.clean) else f"{s.tps_median / hf.tps_median:.2f}"
        memory = "—" if s is hf else f"{s.peak_mb / hf.peak_mb:.2f}"
        speed = f"{s.tps_median:.0f} [{s.tps_q1:.0f}, {s.tps_q3:.0f}]" if s.clean else "n/a"
        lines.append(f"| {s.arm} | {speed} | {s.clean}/{s.timed} | "
                     f"{s.tps_all:.0f} | {s.peak_mb:.0f} | {ratio} | {memory} | {s.final_loss:.3f} | {s.wall_s:.0f} |")
    return "\n".join(lines)


def verdict(summaries: list[Summary]) -> str:
    hf = summaries[-1]
    lines = []
    for s in summaries[:-1]:
        lean = s.peak_mb <= hf.peak_mb
        memory = f"{'no more' if lean else 'more'} memory ({s.peak_mb / hf.peak_mb:.2f}x HF peak RSS)"
        if not (enough(s) and enough(hf)):
            lines.append(f"- {s.arm}: {memory}; speed inconclusive (too few uncontended steps: "
                         f"{s.clean} ours, {hf.clean} HF): rerun on an idle machine.")
            continue
        fast = s.tps_median >= hf.tps_median
        lines.append(f"- {s.arm}: {'at least as fast' if fast else 'slower'} ({s.tps_median / hf.tps_median:.2f}x HF "
                     f"tokens/s), {memory}: target {'met' if fast and lean else 'NOT met'}.")
    return "\n".join(lines)


def plot(runs: list[Run], summaries: list[Summary], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(ARMS, ("tab:blue", "tab:cyan", "tab:orange")))
    styles = dict(zip(ARMS, ("-", "--", "-")))
    fig, (speed, loss, memory) = plt.subplots(1, 3, figsize=(14, 4))
    for index, run in enumerate(runs):
        label = run.arm if all(r.arm != run.arm for r in runs[:index]) else None
        steps = [row["step"] for row in run.rows]
        style = {"color": colors[run.arm], "linestyle": styles[run.arm], "label": label}
        speed.plot(steps, [row["tokens_per_s"] for row in run.rows], **style)
        busy = [row for row in run.rows if row["contended"]]
        marked = "contended (not counted)" in speed.get_legend_handles_labels()[1]
        speed.plot([row["step"] for row in busy], [row["tokens_per_s"] for row in busy], "x", color="red",
                   label=None if marked or not busy else "contended (not counted)")
        loss.plot(steps, [row.get("loss", float("nan")) for row in run.rows], **style)
    speed.axvspan(0.5, WARMUP_STEPS + 0.5, color="grey", alpha=0.15, label="warm-up (not counted)")
    speed.set(xlabel="step", ylabel="tokens/s (non-padding)", title="throughput per step")
    loss.set(xlabel="step", ylabel="training loss", title="loss (different batch orders)")
    speed.legend(fontsize=8)
    loss.legend(fontsize=8)
    memory.bar([s.arm.replace(" + ", "\n+ ") for s in summaries], [s.peak_mb for s in summaries],
               color=[colors[s.arm] for s in summaries])
    memory.set(ylabel="peak RSS (MB)", title="peak memory of the training process")
    memory.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    return f"{os.cpu_count()}-core CPU ({model}), Linux {platform.release()}"


def section(runs: list[Run], summaries: list[Summary], prepared: Prepared, args: argparse.Namespace) -> str:
    import peft
    import torch
    import transformers

    import deepspeed

    hf = prepared.hf
    command = " ".join(["benchmarks/e2e.py", *args.argv])
    model = "a tiny random Llama (`models/tiny.yaml`, smoke run)" if args.quick else "SmolLM2-135M-Instruct"
    return f"""{SECTION}

`benchmarks/e2e.py` trains a text-only LoRA on {model} (fp32) three times, each in its
own process, one after the other in one invocation: our `train.py` with DeepSpeed ZeRO-0 and
ZeRO-2 (recipe `benchmarks/e2e_text_lora.yaml`: a `plora` adapter with `modalities: [text]`, i.e. a
plain LoRA on every token), and Hugging Face `Trainer` on `peft.get_peft_model(LoraConfig(...))`
(fp32, `use_cpu=True`, `dataloader_num_workers=0`, no eval, no saving, `report_to=[]`, its default
optimizer). Command: `.venv/bin/python {command}`.

Machine: {machine()}, {args.threads} torch threads per run; torch {torch.__version__},
transformers {transformers.__version__}, peft {peft.__version__}, deepspeed {deepspeed.__version__}.
The machine is shared: while each run lasts, the benchmark samples every {SAMPLE_S:g} s how much CPU
other processes use (`/proc/stat` minus the run's own process tree) and when each metrics row appears.
A step during which other processes kept more than {args.contended_above:g} cores busy is *contended*
(two 2-thread jobs on two cores slow each other down several-fold) and is left out of the headline
median; the all-steps median is shown beside it. Other processes' CPU, averaged over each whole run:
{'; '.join(f"{run.arm} {run.other_cores:.2f} cores" for run in runs)}.

Same for every run: the base weights; {prepared.count} conversations built from the shapes captions
(three "rewrite in capital letters" turns each, SmolLM2's default system prompt), all exactly
{prepared.length} tokens long, so there is no padding; batch {args.batch_size} ({args.batch_size * prepared.length}
tokens per step); {args.steps} steps; {args.repeats} repetition(s), order rotated per repetition;
LoRA r = {hf['r']}, alpha = {hf['alpha']:g}, dropout 0 on {', '.join(hf['targets'])};
AdamW, constant lr {hf['lr']:g}, weight decay {hf['weight_decay']:g}, gradient clipping {hf['max_grad_norm']:g};
`{hf['attn']}` attention on both sides (the recipe's; HF's own default would be `sdpa`); loss on the
assistant turns only. tokens/s: non-padding tokens of a step over its time, from fetching the batch to
the end of the optimizer step (ours: `metrics.jsonl`; HF: a `TrainerCallback` plus a `get_batch_samples`
override that starts the clock), median over the uncontended steps among {WARMUP_STEPS + 1}–{args.steps}
(the first {WARMUP_STEPS} are warm-up), IQR in brackets. Peak memory: `ru_maxrss` of the training
process (model loading included), as our trainer reports it. Process wall: the whole subprocess
(imports, loading, training, and for ours the DeepSpeed checkpoint and adapter export). The two sides
see the batches in different orders, so their losses differ step by step.

{table(summaries)}

![tokens/s per step, loss and peak memory](benchmarks/e2e.png)

Target (ours at least as fast as HF + PEFT at no more memory):
{verdict(summaries)}
"""


# ---- command line ----------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (the first 2 are warm-up)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per step, both sides")
    parser.add_argument("--repeats", type=int, default=1, help="runs per arm, order rotated per repetition")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads per run")
    parser.add_argument("--contended-above", type=float, default=0.25, metavar="CORES",
                        help="a step is contended when other processes kept more cores than this busy")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny random Llama, 3 steps, batch 2")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md and benchmarks/e2e.png")
    parser.add_argument("--hf-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    if args.quick:
        args.steps, args.batch_size = 3, 2
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    args.overrides = [f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
                      f"train.threads={args.threads}"]
    if args.quick:
        args.overrides.append("model.llm=" + json.dumps(tiny_llm()))
    return args


def tiny_llm() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "models" / "tiny.yaml").read_text())["llm"]


def main() -> None:
    args = parse_args()
    if args.hf_worker:
        hf_worker(args.hf_worker)
        return
    with tempfile.TemporaryDirectory(prefix="mmadapt-e2e-") as tmp:
        work = Path(tmp)
        prepared = prepare(work, args.overrides)
        print(f"{prepared.count} samples of {prepared.length} tokens; batch {args.batch_size}, {args.steps} steps, "
              f"{args.threads} threads", flush=True)
        runs = run_all(prepared, work, args)
    summaries = summarize(runs)
    print(table(summaries))
    print(verdict(summaries))
    if args.write:
        plot(runs, summaries, ROOT / "benchmarks" / "e2e.png")
        write_section(SECTION, section(runs, summaries, prepared, args), ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
