"""Peak memory of one BLSP-KD training step with the teacher pass vs the student-only step.

The teacher (the LLM with adapters off, fed the transcript) runs under ``torch.no_grad()``,
so it keeps no activations for backward; only its logits on the continuation rows stay.
Both arms run in fresh processes on the same batch of the bundled speech set:

  student only   the student's forward + backward with cross-entropy on the continuation
  student + KD   the full BLSP-KD step: teacher pass, student pass, KD + input KL + quantity

Memory is the peak resident set (``ru_maxrss``) of the process: once after building the
model and loading the batch (the floor both arms share), once after two steps. On a
GPU it is ``torch.cuda.max_memory_allocated``. The ratio the issue asks for is of the
step's peak over the floor (activations, gradients, logits), and of the whole process.

Run:  .venv/bin/python benchmarks/kd_memory.py [--model models/smollm2-speech.yaml] [--batch-size 16] [--write]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from _report import write_section

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## BLSP-KD teacher pass memory"
ARMS = ("student only", "student + KD")


def peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(arm: str, model_preset: str, batch_size: int, device: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import mmadapt
    from mmadapt.build import model_dataset
    from mmadapt.data import Collator
    from mmadapt.evaluate import model_inputs

    torch.manual_seed(0)
    cfg = mmadapt.load_config(ROOT / "configs" / "blsp_kd.yaml", [f"model={model_preset}"])
    model = mmadapt.build_model(cfg).to(device).train()
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith("llm.") or ".mmadapt." in name)
    dataset, _ = model_dataset(cfg, model, cfg.data.train)
    batch = Collator(model.tokenizer.pad_token_id)([dataset[i] for i in range(batch_size)])
    inputs = {k: v.to(device) for k, v in model_inputs(batch).items() if v is not None}
    if arm == "student only":
        inputs = {k: v for k, v in inputs.items() if not k.startswith("teacher_")}
    floor = peak_mb(device)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        model(**inputs, return_logits=False).loss.backward()
    return {"arm": arm, "floor_mb": floor, "peak_mb": peak_mb(device)}


def run_arm(arm: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", arm, "--model", args.model, "--batch-size", str(args.batch_size),
               "--device", args.device]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict], args) -> str:
    student, kd = results["student only"], results["student + KD"]
    step = {arm: r["peak_mb"] - r["floor_mb"] for arm, r in results.items()}
    lines = [
        SECTION,
        "",
        f"`{args.model}`, batch {args.batch_size} of `data/speech/train.jsonl`, device {args.device}, fp32; "
        f"each arm in a fresh process (`benchmarks/kd_memory.py`).",
        "",
        "| arm | process peak (MB) | step above the loaded model (MB) |",
        "|---|---|---|",
        *(f"| {arm} | {results[arm]['peak_mb']:.0f} | {step[arm]:.0f} |" for arm in ARMS),
        "",
        f"With the teacher pass: **{kd['peak_mb'] / student['peak_mb']:.2f}x** the student-only process peak, "
        f"**{step['student + KD'] / max(step['student only'], 1e-9):.2f}x** its step memory (target: at most 1.3x).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/smollm2-speech.yaml")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.batch_size, args.device)))
        return
    results = {arm: run_arm(arm, args) for arm in ARMS}
    text = report(results, args)
    print(text)
    if args.write:
        write_section(SECTION, text, ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
