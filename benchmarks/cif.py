"""Speed of mmadapt's loop-free ``cif`` against the per-frame integrate loop most CIF code uses.

The reference, ``integrate_loop``, follows the structure of FunASR's ``cif`` (and BLSP's
``forward_cif``): one Python step per frame, vectorised over the batch, carrying the
weight integrated so far and the token being built, appending the running token at every
frame and gathering the fired ones at the end. It handles at most one firing per frame,
so every alpha here is below the threshold. It is a little faster than the original: the
per-step allocations (``torch.ones(...)``, ``.repeat(1, H)``) are left out, and the frames
are sliced once with ``unbind`` instead of ``hidden[:, t, :]`` per step, whose backward
writes a zero tensor the size of ``hidden`` for every frame (tens of seconds here).

Both run forward, and forward + backward (gradients to hidden and alphas), on the same
inputs, interleaved per repetition (``benchmarks/_timing.py``); speed-ups are medians of
per-repetition ratios. Before timing, both run in float64 on those inputs and must give the
same token counts and tokens.

Run:  .venv/bin/python benchmarks/cif.py [--reps N] [--train-reps N] [--quick] [--write]
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _report import write_section
from _timing import Timings, load_note, median_iqr, paired_ratios, time_interleaved

from mmadapt.encoders.cif import cif

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## CIF"
FRAMES, WIDTH = 1500, 512  # 30 s of Whisper frames (50 Hz) per row, a Whisper-base width
# The loop costs one Python step per frame whatever the batch; ours reads all B·T·D numbers once
BATCHES = (1, 8)
# alphas ~ U(0, 2·mean): 0.1 is ~5 text tokens per second of speech at 50 Hz; 0.5 is a dense stress case
ALPHA_MEANS = (0.1, 0.5)
TARGET = 50.0  # required speed-up of the forward pass
MAX_FOREIGN = 0.1


def integrate_loop(
    hidden: torch.Tensor, alphas: torch.Tensor, threshold: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIF with one Python step per frame (FunASR's structure); alphas must stay below ``threshold``."""
    batch, time, width = hidden.shape
    integrated = alphas.new_zeros(batch)  # weight since the last firing
    token = hidden.new_zeros(batch, width)  # the token being integrated
    fired, running = [], []
    for alpha, frame in zip(alphas.unbind(1), hidden.unbind(1)):  # (B,), (B, D)
        missing = threshold - integrated
        integrated = integrated + alpha
        fires = integrated >= threshold
        used = torch.where(fires, missing, alpha)  # the part of alpha that completes the token
        token = token + used[:, None] * frame
        fired.append(fires)
        running.append(token)
        integrated = torch.where(fires, integrated - threshold, integrated)
        token = torch.where(fires[:, None], (alpha - used)[:, None] * frame, token)
    fired_at, tokens_at = torch.stack(fired, 1), torch.stack(running, 1)  # (B, T), (B, T, D)
    lengths = fired_at.sum(1)
    rows = [tokens_at[b, fired_at[b]] for b in range(batch)]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths


@dataclass
class Result:
    batch: int
    alpha_mean: float
    tokens: int  # tokens per row, mean
    max_abs_diff: float  # float64 agreement
    forward: Timings  # "loop", "ours": seconds per forward (no autograd)
    train: Timings  # "loop", "ours": seconds per forward + backward

    def timings(self, mode: str) -> Timings:
        return self.forward if mode == "fwd" else self.train

    def ms(self, mode: str, name: str) -> float:
        return 1e3 * median_iqr(self.timings(mode).times[name])[0]

    def speedup(self, mode: str) -> tuple[float, float, float]:
        times = self.timings(mode).times
        return median_iqr(paired_ratios(times["loop"], times["ours"]))


def inputs(
    batch: int, alpha_mean: float, generator: torch.Generator, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = torch.randn(batch, FRAMES, WIDTH, generator=generator, dtype=dtype)
    alphas = 2 * alpha_mean * torch.rand(batch, FRAMES, generator=generator, dtype=dtype)
    return hidden, alphas


def check_agreement(batch: int, alpha_mean: float) -> tuple[int, float]:
    """Both implementations in float64 on the benchmark's inputs: (mean tokens per row, max |diff|)."""
    hidden, alphas = inputs(batch, alpha_mean, torch.Generator().manual_seed(0), torch.float64)
    ours, ours_lengths = cif(hidden, alphas)
    loop, loop_lengths = integrate_loop(hidden, alphas)
    if not torch.equal(ours_lengths, loop_lengths):
        raise AssertionError(f"token counts differ: {ours_lengths.tolist()} vs {loop_lengths.tolist()}")
    return round(float(ours_lengths.double().mean())), float((ours - loop).abs().max())


def forward_backward(
    fn: Callable, hidden: torch.Tensor, alphas: torch.Tensor, upstream: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        hidden.grad = alphas.grad = None
        tokens, _ = fn(hidden, alphas)
        (tokens * upstream[:, : tokens.shape[1]]).sum().backward()

    return step


def measure(batch: int, alpha_mean: float, reps: int, train_reps: int) -> Result:
    tokens, diff = check_agreement(batch, alpha_mean)
    hidden, alphas = inputs(batch, alpha_mean, torch.Generator().manual_seed(0), torch.float32)
    hidden.requires_grad_()
    alphas.requires_grad_()
    upstream = torch.randn(batch, FRAMES, WIDTH)
    impls = {"loop": integrate_loop, "ours": cif}
    forward = {name: lambda fn=fn: torch.no_grad()(fn)(hidden, alphas) for name, fn in impls.items()}
    train = {name: forward_backward(fn, hidden, alphas, upstream) for name, fn in impls.items()}
    return Result(
        batch, alpha_mean, tokens, diff,
        time_interleaved(forward, reps, warmup=2, max_foreign=MAX_FOREIGN),
        time_interleaved(train, train_reps, warmup=1, max_foreign=MAX_FOREIGN),
    )


def table(results: list[Result]) -> str:
    lines = [
        "| batch | alpha mean | tokens / row | float64 max abs diff | loop fwd | ours fwd | speed-up fwd | "
        "loop fwd+bwd | ours fwd+bwd | speed-up fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        cells = [str(res.batch), f"{res.alpha_mean}", str(res.tokens), f"{res.max_abs_diff:.1e}"]
        for mode in ("fwd", "fwd+bwd"):
            median, q1, q3 = res.speedup(mode)
            cells += [f"{res.ms(mode, 'loop'):.1f} ms", f"{res.ms(mode, 'ours'):.2f} ms"]
            cells.append(f"{median:.0f}x [{q1:.0f}, {q3:.0f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(results: list[Result]) -> str:
    lines = [f"Target: forward >= {TARGET:.0f}x faster than the loop"]
    for batch in BATCHES:
        worst = min(res.speedup("fwd")[0] for res in results if res.batch == batch)
        lines.append(f"- batch {batch}: {'met' if worst >= TARGET else 'MISSED'} (worst {worst:.0f}x)")
    return "\n".join(lines)


def section(results: list[Result], args: argparse.Namespace) -> str:
    return f"""{SECTION}

`benchmarks/cif.py` times `mmadapt.encoders.cif.cif` (closed form, no loop over frames or
tokens: the band of CIF weights is listed with tensor ops and summed by one `F.embedding_bag`) against
`integrate_loop`, a per-frame Python loop with the structure of FunASR's `cif` (one step per
frame, vectorised over the batch; written in the script). Run
`.venv/bin/python benchmarks/cif.py --write` ({args.reps} forward and {args.train_reps} forward + backward
repetitions, interleaved; speed-ups are medians of per-repetition ratios, brackets the
interquartile range).

Setup: fp32, CPU ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__};
batch {" and ".join(map(str, BATCHES))} x {FRAMES} frames (30 s of Whisper's 50 Hz frames) x width {WIDTH}; alphas uniform in
[0, 2·mean), no padding; threshold 1. Mean 0.1 is speech-like (~5 text tokens per second);
0.5 is a dense stress case. fwd+bwd backpropagates a random projection of the tokens to both
hidden and alphas. Agreement: both implementations run in float64 on the same inputs give equal
token counts, tokens within the "max abs diff" column. {load_note([t for res in results for t in (res.forward, res.train)], MAX_FOREIGN)}

{table(results)}

{verdict(results)}

Why the batch decides it: the loop's cost is {FRAMES} Python steps of tiny tensor ops, nearly the
same at batch 1 and 8, while `cif` reads every one of the B·T·D numbers of `hidden`, so its time
grows with the batch and the ratio falls. At batch 8 (24.6 MB of frames) the `embedding_bag` is
most of it: about 1.6x a plain `hidden.sum(0)` on the same two threads (a read at memory speed),
and the ~40 index ops that list the band add ~0.5–1 ms. More tensor ops cannot remove either;
only a fused kernel (C++ or a compiler) could approach a single read, ~60–90x here. Tried on
2026-11-26 and dropped: a two-pass form (each frame weighted once into the token it starts in,
plus the frame that crosses into each token gathered separately) avoids `repeat_interleave`
but reads the crossing frames again after the bag pass has evicted them from cache, and was
slower in an A/B in one process (32x against 37x at mean 0.1, 16x against 28x at 0.5). The
loop's own time moves by ±30 % between runs on this VM, which moves the batch-8 ratio across
30–50x; the batch-1 rows are far from that edge.
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed forward repetitions per variant")
    parser.add_argument("--train-reps", type=int, default=5, help="timed forward + backward repetitions per variant")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions")
    parser.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.train_reps = 2, 1
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    results = [measure(batch, mean, args.reps, args.train_reps) for batch in BATCHES for mean in ALPHA_MEANS]
    print(table(results))
    print(verdict(results))
    print(load_note([t for res in results for t in (res.forward, res.train)], MAX_FOREIGN))
    if args.write:
        write_section(SECTION, section(results, args), ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
