"""Cost of one PLoRA-adapted linear layer (forward + backward) against its baselines.

Times, in one process and interleaved per repetition, a frozen ``nn.Linear`` with
a trainable rank-r adapter in these forms:

  base                 the frozen linear alone
  ours                 mmadapt PLoRA: inject() + modality_ids(); gather image rows,
                       low-rank, index_add
  (a) XComposer2       res = base(x); res[mask] += B(A(x[mask])) * s  (boolean index per call)
  (b) all rows + mask  res = base(x) + mask[..., None] * B(A(x)) * s
  (c) PEFT all rows    peft LoRA on every row, no mask
  ours, proposed       ours with the AdapterStack.add_deltas proposed in BENCHMARKS.md
                       (prototype below): delta added in place, scaling in rank space
  GEMM floor           base plus the adapter's six matmuls on already-gathered rows: what
                       any gather-based PLoRA costs with this BLAS (not a usable layer)

at 25 %, 50 % and 90 % image tokens (one contiguous image block per sequence).
Overheads are per-repetition ratios to base, so machine drift cancels.

Run:  .venv/bin/python benchmarks/plora.py [--quick] [--reps N] [--threads N] [--write]
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
from peft import LoraConfig, get_peft_model
from torch import nn

from mmadapt.adapters import adapter_parameters, inject, modality_ids
from mmadapt.adapters.base import AdapterStack
from mmadapt.adapters.plora import PLoRA
from mmadapt.modality import IMAGE, TEXT

D_IN, D_OUT = 576, 1536  # SmolLM2-135M MLP gate/up projection
RANKS = (64, 36)  # our SmolLM2 recipe; XComposer2's r/d = 256/4096 = 1/16 applied to d = 576
FRACTIONS = (0.25, 0.5, 0.9)
VARIANTS = ("base", "ours", "(a) XComposer2", "(b) all rows + mask", "(c) PEFT all rows", "ours, proposed", "GEMM floor")
MASKED = ("ours", "(a) XComposer2", "(b) all rows + mask", "ours, proposed")  # same math on every row
ROOT = Path(__file__).resolve().parent.parent
SECTION = "## PLoRA layer cost"
MAX_FOREIGN = 0.1  # repetitions during which other processes used more of the CPUs are run again


@dataclass
class Problem:
    """One timed configuration: shared weights, input, upstream gradient and token modalities."""

    r: int
    weight: torch.Tensor  # (D_OUT, D_IN), frozen
    lora_a: torch.Tensor  # (r, D_IN)
    lora_b: torch.Tensor  # (D_OUT, r), non-zero so the adapter path is real
    x: torch.Tensor  # (B, T, D_IN), requires grad: earlier layers need it
    grad_out: torch.Tensor  # (B, T, D_OUT)
    ids: torch.Tensor  # (B, T) TEXT / IMAGE
    scaling: float = 2.0

    @property
    def mask(self) -> torch.Tensor:  # (B, T) bool
        return self.ids == IMAGE


def image_ids(batch: int, seq: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """One contiguous image block per sequence at a random offset, like a prompt with an image."""
    n_image = round(fraction * seq)
    ids = torch.full((batch, seq), TEXT)
    for row in ids:
        start = int(torch.randint(0, seq - n_image + 1, (1,), generator=generator))
        row[start : start + n_image] = IMAGE
    return ids


def make_problem(r: int, fraction: float, batch: int, seq: int) -> Problem:
    g = torch.Generator().manual_seed(0)
    return Problem(
        r=r,
        weight=torch.randn(D_OUT, D_IN, generator=g) / D_IN**0.5,
        lora_a=torch.randn(r, D_IN, generator=g) / D_IN**0.5,
        lora_b=torch.randn(D_OUT, r, generator=g) / r**0.5,
        x=torch.randn(batch, seq, D_IN, generator=g).requires_grad_(),
        grad_out=torch.randn(batch, seq, D_OUT, generator=g),
        ids=image_ids(batch, seq, fraction, g),
    )


def flop_share(p: Problem) -> float:
    """Adapter fwd+bwd FLOPs on the image rows / frozen base fwd+bwd FLOPs on all rows.

    Base on N rows: forward 2*N*D_IN*D_OUT; backward only the input gradient
    (2*N*D_IN*D_OUT): the frozen weight needs no weight gradient, but x needs
    one for the layers below. Adapter on M image rows, per matmul (A: D_IN -> r,
    B: r -> D_OUT): forward 2*M*r*d, backward weight gradient 2*M*r*d and input
    gradient 2*M*r*d (B's input gradient feeds A; A's feeds x), so
    6*M*r*(D_IN + D_OUT) in all. Elementwise work (scaling, adds) is O(M*D_OUT)
    and left out.
    """
    n_rows, n_image = p.ids.numel(), int(p.mask.sum())
    return 6 * n_image * p.r * (D_IN + D_OUT) / (4 * n_rows * D_IN * D_OUT)


def frozen_linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer.requires_grad_(False)


class Holder(nn.Module):
    """The container inject() and PEFT need: the adapted linear as a named child."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = frozen_linear(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class LowRankLinear(nn.Module):
    """A frozen linear plus a trainable LoRA pair; subclasses choose where it applies."""

    def __init__(self, p: Problem) -> None:
        super().__init__()
        self.base = frozen_linear(p.weight)
        self.lora_A = nn.Linear(D_IN, p.r, bias=False)
        self.lora_B = nn.Linear(p.r, D_OUT, bias=False)
        self.lora_dropout = nn.Identity()  # p = 0 in every variant: same math everywhere
        self.scaling = p.scaling
        set_low_rank(dict(self.named_parameters()), p)


class XComposer2PLoRA(LowRankLinear):
    """XComposer2's PLoRA forward: boolean-index the image rows in every call."""

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor) -> torch.Tensor:
        res = self.base(x)
        if torch.sum(im_mask) > 0:
            part_x = x[im_mask]
            res[im_mask] += self.lora_B(self.lora_A(self.lora_dropout(part_x))) * self.scaling
        return res


class MaskedLoRA(LowRankLinear):
    """LoRA on every row, zeroed on text rows afterwards."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.base(x) + mask[..., None] * self.lora_B(self.lora_A(x)) * self.scaling


def set_low_rank(params: dict[str, torch.Tensor], p: Problem) -> list[torch.Tensor]:
    """Copy the shared A/B weights into a variant's trainable ``lora_A`` / ``lora_B``."""
    trainable = {name: t for name, t in params.items() if t.requires_grad}
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(p.lora_a if "lora_A" in name else p.lora_b)
    return list(trainable.values())


class _AddRowsInPlace(torch.autograd.Function):
    """``y.view(-1, out)[rows] += delta`` in place; the gradient passes to ``y`` uncopied."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(y)
        ctx.save_for_backward(rows)
        y.view(-1, y.shape[-1]).index_add_(0, rows, delta)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        (rows,) = ctx.saved_tensors
        return grad, None, grad.reshape(-1, grad.shape[-1]).index_select(0, rows)


class ProposedStack(AdapterStack):
    """Prototype of the proposed ``AdapterStack.add_deltas``: no full copy of the output."""

    def add_deltas(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_flat = x.reshape(-1, x.shape[-1])
        for adapter in self.values():
            rows = self.context.rows(adapter.modalities, x)
            if rows is not None:
                y = _AddRowsInPlace.apply(y, rows, adapter(x_flat.index_select(0, rows)).to(y.dtype))
        return y


class RankScaledPLoRA(PLoRA):
    """Prototype of the proposed ``PLoRA.forward``: scale the (M, r) activation, not the (M, out) delta."""

    def forward(self, x_rows: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x_rows)) * self.scaling)


def injected(p: Problem, proposed: bool = False) -> Holder:
    """A Holder with mmadapt PLoRA on ``proj``; ``proposed`` swaps in the prototypes above."""
    holder = Holder(p.weight)
    inject(holder, [{"type": "plora", "modalities": ["image"], "targets": ["proj"], "r": p.r, "alpha": p.scaling * p.r}])
    if proposed:
        holder.proj.mmadapt.__class__ = ProposedStack
        holder.proj.mmadapt["plora"].__class__ = RankScaledPLoRA
    return holder


def forwards(p: Problem) -> dict[str, tuple[Callable[[], torch.Tensor], list[torch.Tensor]]]:
    """Each variant's forward on ``p.x`` and its trainable tensors."""
    base = frozen_linear(p.weight)
    ours, proposed = injected(p), injected(p, proposed=True)
    xcomposer, masked = XComposer2PLoRA(p), MaskedLoRA(p)
    config = LoraConfig(r=p.r, lora_alpha=p.scaling * p.r, target_modules=["proj"], lora_dropout=0.0)
    peft_model = get_peft_model(Holder(p.weight), config)
    mask = p.mask

    def in_context(holder: Holder) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with modality_ids(holder, p.ids):
                return holder(p.x)

        return run

    return {
        "base": (lambda: base(p.x), []),
        "ours": (in_context(ours), set_low_rank(adapter_parameters(ours), p)),
        "(a) XComposer2": (lambda: xcomposer(p.x, mask), set_low_rank(dict(xcomposer.named_parameters()), p)),
        "(b) all rows + mask": (lambda: masked(p.x, mask), set_low_rank(dict(masked.named_parameters()), p)),
        "(c) PEFT all rows": (lambda: peft_model(p.x), set_low_rank(dict(peft_model.named_parameters()), p)),
        "ours, proposed": (in_context(proposed), set_low_rank(adapter_parameters(proposed), p)),
    }


def check_agreement(fns: dict, p: Problem) -> None:
    """Masked variants agree on outputs and gradients; (c) matches them on the image rows."""
    outputs, grads = {}, {}
    for name, (forward, params) in fns.items():
        p.x.grad = None
        outputs[name] = forward()
        outputs[name].backward(p.grad_out)
        grads[name] = [p.x.grad, *(t.grad for t in params)]
        for t in params:
            t.grad = None
    for name in MASKED:
        torch.testing.assert_close(outputs[name], outputs["ours"])
        torch.testing.assert_close(grads[name], grads["ours"], rtol=1e-3, atol=1e-3)  # fp32 sum order
    torch.testing.assert_close(outputs["(c) PEFT all rows"][p.mask], outputs["ours"][p.mask])
    assert not torch.allclose(outputs["ours"][p.mask], outputs["base"][p.mask]), "adapter path is a no-op"


def train_step(forward: Callable[[], torch.Tensor], params: list[torch.Tensor], p: Problem) -> Callable[[], None]:
    def step() -> None:
        for t in (p.x, *params):
            t.grad = None
        forward().backward(p.grad_out)

    return step


def gemm_floor_step(p: Problem) -> Callable[[], None]:
    """Base fwd+bwd plus the adapter's matmuls on contiguous rows: no gather, scatter or scaling."""
    base = frozen_linear(p.weight)
    n_image = int(p.mask.sum())
    x_rows = torch.randn(n_image, D_IN).requires_grad_()  # (M, D_IN)
    grad_rows = torch.randn(n_image, D_OUT)
    lora_a, lora_b = p.lora_a.clone().requires_grad_(), p.lora_b.clone().requires_grad_()

    def step() -> None:
        for t in (p.x, x_rows, lora_a, lora_b):
            t.grad = None
        outputs = [base(p.x), x_rows @ lora_a.T @ lora_b.T]
        torch.autograd.backward(outputs, [p.grad_out, grad_rows])

    return step


@dataclass
class Result:
    r: int
    fraction: float
    share: float
    timings: Timings  # seconds per fwd+bwd, per repetition

    @property
    def times(self) -> dict[str, list[float]]:
        return self.timings.times

    def ms(self, name: str) -> float:
        return 1e3 * median_iqr(self.times[name])[0]

    def overhead(self, name: str) -> tuple[float, float, float]:
        """(median, q1, q3) of the per-repetition time ratio to base, minus one."""
        return median_iqr([t - 1 for t in paired_ratios(self.times[name], self.times["base"])])

    def ours_vs_xcomposer(self) -> tuple[float, float, float]:
        return median_iqr(paired_ratios(self.times["ours"], self.times["(a) XComposer2"]))


def measure(r: int, fraction: float, args: argparse.Namespace) -> Result:
    start = time.perf_counter()
    p = make_problem(r, fraction, args.batch, args.seq)
    fns = forwards(p)
    check_agreement(fns, p)
    steps = {name: train_step(forward, params, p) for name, (forward, params) in fns.items()}
    steps["GEMM floor"] = gemm_floor_step(p)
    result = Result(r, fraction, flop_share(p), time_interleaved(steps, args.reps, args.warmup, MAX_FOREIGN))
    foreign = statistics.median(result.timings.foreign)
    print(f"r={r}, {fraction:.0%} image: {time.perf_counter() - start:.0f} s, foreign load {foreign:.1%}", file=sys.stderr)
    return result


def table(results: list[Result]) -> str:
    head = ["r", "image tokens", "FLOP share", "base", *VARIANTS[1:], "overhead / share: ours, proposed, floor", "ours / (a)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        contended = " (contended)" if statistics.median(res.timings.foreign) > MAX_FOREIGN else ""
        cells = [str(res.r), f"{res.fraction:.0%}{contended}", f"{res.share:.1%}", f"{res.ms('base'):.1f} ms"]
        for name in VARIANTS[1:]:
            median, q1, q3 = res.overhead(name)
            cells.append(f"{res.ms(name):.1f} ms, {median:+.1%} [{q1:+.1%}, {q3:+.1%}]")
        ratio, q1, q3 = res.ours_vs_xcomposer()
        per_share = ", ".join(f"{res.overhead(name)[0] / res.share:.2f}x" for name in ("ours", "ours, proposed", "GEMM floor"))
        cells += [per_share, f"{ratio:.3f} [{q1:.3f}, {q3:.3f}]"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(results: list[Result]) -> str:
    share_ok = all(res.overhead("ours")[0] <= 1.5 * res.share for res in results)
    speed_ok = all(res.ours_vs_xcomposer()[0] <= 1.03 for res in results)
    worst_share = max(res.overhead("ours")[0] / res.share for res in results)
    worst_speed = max(res.ours_vs_xcomposer()[0] for res in results)
    return (
        f"- ours overhead <= 1.5x its FLOP share: {'met' if share_ok else 'MISSED'} (worst {worst_share:.2f}x)\n"
        f"- ours not slower than (a) beyond 3 %: {'met' if speed_ok else 'MISSED'} (worst {worst_speed:.3f})"
    )


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RANKS), figsize=(6 * len(RANKS), 4.5), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], RANKS):
        rows = [res for res in results if res.r == r]
        fractions = [100 * res.fraction for res in rows]
        for name in VARIANTS[1:]:
            median, q1, q3 = zip(*(res.overhead(name) for res in rows))
            err = [[100 * (m - lo) for m, lo in zip(median, q1)], [100 * (hi - m) for m, hi in zip(median, q3)]]
            ax.errorbar(fractions, [100 * m for m in median], yerr=err, marker="o", capsize=3, label=name)
        ax.plot(fractions, [100 * res.share for res in rows], "k--", label="adapter FLOP share")
        ax.plot(fractions, [150 * res.share for res in rows], "k:", label="1.5x FLOP share (target)")
        ax.set(title=f"{D_IN}->{D_OUT}, r={r}", xlabel="image tokens (%)", ylabel="fwd+bwd overhead over base (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def section(results: list[Result], args: argparse.Namespace) -> str:
    return f"""{SECTION}

`benchmarks/plora.py` times forward + backward of one adapted linear layer, all variants in
one process, interleaved per repetition; overheads are medians of per-repetition ratios to
the frozen base layer, brackets the interquartile range. Run
`.venv/bin/python benchmarks/plora.py --write` ({args.reps} repetitions, {args.warmup} warm-up).

Setup: fp32, CPU ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__};
layer {D_IN} -> {D_OUT} (SmolLM2-135M's MLP gate/up projection), batch {args.batch} x seq {args.seq},
one contiguous image block per sequence. Ranks: r = 64 is our SmolLM2 recipe; r = 36 is
XComposer2's r/d = 256/4096 = 1/16 on d = 576, which gives an adapter/base FLOP ratio
(r/d_in + r/d_out = 0.086) close to InternLM2-7B's gate/up projection with r = 256 (0.080).
The base weight is frozen, A and B are trainable, B is non-zero, dropout is off everywhere;
the input requires grad, as it does inside a model. `ours` includes the once-per-forward
`nonzero` that a real model shares across all its adapted layers.

FLOP share = adapter fwd+bwd FLOPs on the M image rows / base fwd+bwd FLOPs on all N rows
= 6·M·r·(d_in + d_out) / (4·N·d_in·d_out): the frozen base does its forward and the input
gradient (no weight gradient); each adapter matmul does forward, weight gradient and input
gradient. Elementwise work (scaling, adds, gathers) is left out of the share.

On a shared 2-core machine another job's load makes every parallel op wait for a scheduler
tick, which penalises variants made of many small ops; `benchmarks/_timing.py` measures
other processes' CPU use per repetition and runs a repetition again above {MAX_FOREIGN:.0%}.
{load_note([res.timings for res in results], MAX_FOREIGN)}

{table(results)}

![PLoRA overhead vs image-token fraction](benchmarks/plora.png)

Targets:
{verdict(results)}

Where the time of `ours` goes beyond its FLOPs (torch profiler, and the `GEMM floor` column:
base plus the adapter's six matmuls on already-gathered rows). First, the rank-r matmuls are
skinny and run below the FLOP rate of the square base matmul, worst when r is not a multiple
of 16 (r = 36): the floor alone comes near or above 1.5x the FLOP share, which leaves the
target little or no room for gather, scatter and scaling. Second,
`AdapterStack.add_deltas` adds memory-bound work that does not shrink with the FLOP share:
the out-of-place `index_add` copies the whole (N, d_out) output before adding M rows (on CPU
it dispatches to `scatter_add`), PLoRA multiplies the (M, d_out) delta by alpha/r in forward
and backward, and the gather's backward builds a zero (N, d_in) gradient that autograd then
adds to the base path's. `ours, proposed` prototypes two changes (classes `ProposedStack`,
`RankScaledPLoRA` in the script): `add_deltas` adds the delta in place through a small
autograd Function (backward hands the output gradient through uncopied and gathers its rows
for the delta), and PLoRA scales the (M, r) activation instead of the (M, d_out) delta.
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 2, 2 repetitions")
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2: the machine's cores)")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md and benchmarks/plora.png")
    args = parser.parse_args()
    args.batch, args.seq, args.warmup = (2, 256, 1) if args.quick else (8, 256, 2)
    args.reps = 2 if args.quick else args.reps
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    results = [measure(r, fraction, args) for r in RANKS for fraction in FRACTIONS]
    print(table(results))
    print(verdict(results))
    print(load_note([res.timings for res in results], MAX_FOREIGN))
    if args.write:
        plot(results, ROOT / "benchmarks" / "plora.png")
        write_section(SECTION, section(results, args), ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
