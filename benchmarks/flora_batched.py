"""fLoRA batched training step against one model pass per example, on SmolLM2-135M.

A batch of B examples, each with its own adapter (K = B adapters), trained two ways
with the same model, adapters, tokens and loss:

  batched   one forward + backward over the whole batch; flora_batched picks each
            row's adapter inside the layer (example_adapters(model, index))
  loop      one forward + backward per example with its own adapter, which is what
            a one-active-adapter library (PEFT in training) forces

The loss is the summed next-token cross-entropy, so both variants produce the same
adapter gradients (checked before timing). Every linear projection of the model
carries flora_batched (text rows, r = 4), in both modes; the base weights are frozen.
The speed-up is the median of per-repetition loop / batched time ratios.

Run:  .venv/bin/python benchmarks/flora_batched.py [--smoke] [--reps N] [--threads N] [--device D] [--write]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _report import write_section
from _timing import Timings, load_note, median_iqr, paired_ratios, time_interleaved
from torch import nn

from mmadapt.adapters import adapter_parameters, inject
from mmadapt.llm import LLMConfig, load_llm
from mmadapt.modality import example_adapters

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## flora_batched"
MODES = ("multiplicative", "additive")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 4
TARGET_SPEEDUP = 4.0
MAX_FOREIGN = 0.1  # repetitions during which other processes used more of the CPUs are run again
SMOKE_LLM = LLMConfig(
    source="random",
    config=dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
)


@dataclass
class Problem:
    """One timed configuration: the adapted model, its trainable tensors, tokens and adapter index."""

    mode: str
    model: nn.Module
    params: list[nn.Parameter]
    tokens: torch.Tensor  # (B, T)
    index: torch.Tensor  # (B,) adapter of each example


def adapted_model(llm: LLMConfig, mode: str, num_adapters: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """The LLM, frozen, with flora_batched on every projection; B is non-zero so the adapter path is real."""
    model = load_llm(llm).model.eval()
    model.requires_grad_(False)
    spec = {"type": "flora_batched", "mode": mode, "modalities": ["text"], "targets": TARGETS}
    inject(model, [spec | {"num_adapters": num_adapters, "r": RANK, "alpha": RANK}])
    params = list(adapter_parameters(model).values())
    torch.manual_seed(0)
    with torch.no_grad():
        for param in params:
            param.normal_(std=0.02)
    return model, params


def make_problem(llm: LLMConfig, mode: str, args: argparse.Namespace) -> Problem:
    model, params = adapted_model(llm, mode, args.adapters)
    model.to(args.device)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator)
    index = torch.arange(args.batch) % args.adapters
    return Problem(mode, model, params, tokens.to(args.device), index.to(args.device))


def summed_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over every token: per-example losses add up to the batch's."""
    logits = model(input_ids=tokens).logits[:, :-1]  # (B, T - 1, V)
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")


def batched_step(p: Problem) -> None:
    with example_adapters(p.model, p.index):
        summed_loss(p.model, p.tokens).backward()


def loop_step(p: Problem) -> None:
    for b in range(p.tokens.shape[0]):
        with example_adapters(p.model, p.index[b : b + 1]):
            summed_loss(p.model, p.tokens[b : b + 1]).backward()


def timed(step: Callable[[Problem], None], p: Problem) -> Callable[[], None]:
    """One training step from zeroed gradients, finished on the device before the clock stops."""

    def run() -> None:
        for param in p.params:
            param.grad = None
        step(p)
        if p.tokens.is_cuda:
            torch.cuda.synchronize()

    return run


def check_agreement(p: Problem) -> None:
    """Both variants give every adapter the same gradient, and each example reaches its own adapter."""
    grads = {}
    for name, step in (("batched", batched_step), ("loop", loop_step)):
        timed(step, p)()
        grads[name] = [param.grad.clone() for param in p.params]
    torch.testing.assert_close(grads["batched"], grads["loop"], rtol=1e-3, atol=1e-4)  # fp32 sum order
    used = p.index.unique()
    assert all(grad[used].abs().sum() > 0 for grad in grads["batched"]), "an adapter in use got no gradient"


@dataclass
class Result:
    mode: str
    timings: Timings

    def ms(self, name: str) -> float:
        return 1e3 * median_iqr(self.timings.times[name])[0]

    def speedup(self) -> tuple[float, float, float]:
        """(median, q1, q3) of the per-repetition loop / batched time ratio."""
        return median_iqr(paired_ratios(self.timings.times["loop"], self.timings.times["batched"]))


def measure(llm: LLMConfig, mode: str, args: argparse.Namespace) -> Result:
    start = time.perf_counter()
    p = make_problem(llm, mode, args)
    check_agreement(p)
    steps = {"batched": timed(batched_step, p), "loop": timed(loop_step, p)}
    result = Result(mode, time_interleaved(steps, args.reps, args.warmup, MAX_FOREIGN))
    foreign = statistics.median(result.timings.foreign)
    print(f"{mode}: {time.perf_counter() - start:.0f} s, foreign load {foreign:.1%}", file=sys.stderr)
    return result


def table(results: list[Result]) -> str:
    head = ["mode", "batched (1 pass)", "loop (1 pass per example)", "speed-up, loop / batched"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        median, q1, q3 = res.speedup()
        speedup = f"{median:.2f}x [{q1:.2f}, {q3:.2f}]"
        cells = [res.mode, f"{res.ms('batched'):.0f} ms", f"{res.ms('loop'):.0f} ms", speedup]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(results: list[Result]) -> str:
    return "\n".join(
        f"- {res.mode}: batched at least {TARGET_SPEEDUP:.0f}x faster than the loop: "
        f"{'met' if res.speedup()[0] >= TARGET_SPEEDUP else 'MISSED'} ({res.speedup()[0]:.2f}x)"
        for res in results
    )


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def section(results: list[Result], args: argparse.Namespace) -> str:
    return f"""{SECTION}

`benchmarks/flora_batched.py` times one training step (forward + backward, adapter gradients
only; the base is frozen) of SmolLM2-135M-Instruct (fp32) with `flora_batched` on all seven
projections of every layer (r = {RANK}, text rows), for a batch of {args.batch} examples of
{args.seq} tokens where each example has its own adapter (K = {args.adapters}). `batched` is one
pass with `example_adapters(model, index)`; `loop` is one pass per example with its own adapter,
what a library with one active adapter at a time (PEFT in training) forces. The loss is the
summed next-token cross-entropy, and both variants are checked to give every adapter the same
gradient before timing. Speed-ups are medians of per-repetition loop / batched ratios, brackets
the interquartile range. Run `.venv/bin/python benchmarks/flora_batched.py --write --device {args.device}`
({args.reps} repetitions, {args.warmup} warm-up).

Setup: {device_name(args.device)}, torch {torch.__version__}. {load_note([res.timings for res in results], MAX_FOREIGN)}

{table(results)}

Target (issue 6): batched forward + backward at B = 16, K = 16 at least {TARGET_SPEEDUP:.0f}x faster
than the per-example loop.
{verdict(results)}
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model, batch 4, 2 repetitions")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2: the machine's cores)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = parser.parse_args()
    args.batch, args.adapters, args.seq, args.warmup = (4, 4, 8, 1) if args.smoke else (16, 16, 32, 2)
    args.reps = 2 if args.smoke else args.reps
    if args.smoke and args.write:
        parser.error("--smoke runs a random model; its numbers do not belong in BENCHMARKS.md")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    llm = SMOKE_LLM if args.smoke else LLMConfig(source="smollm2")
    results = [measure(llm, mode, args) for mode in MODES]
    print(table(results))
    print(verdict(results))
    print(load_note([res.timings for res in results], MAX_FOREIGN))
    if args.write:
        write_section(SECTION, section(results, args), ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
