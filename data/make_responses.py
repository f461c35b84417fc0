"""Write the teacher's continuation (``response``) into BLSP-KD records, once, before training.

The teacher is the recipe's LLM without adapters, prompted exactly as in training
(``data.speech_prompt`` filled with the transcript, ``data.system_prompt``); greedy
decoding, so the result is reproducible. Training then never waits on generation.

    python data/make_responses.py --config configs/blsp_kd.yaml [--max-new-tokens 12] [--force]

Rewrites ``data.train`` and ``data.eval`` in place (through a temporary file), keeping
every other key; records that already have a response are left alone unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mmadapt.config import load_config
from mmadapt.data.records import write_jsonl
from mmadapt.data.tokenize import distillation_prompt
from mmadapt.llm import load_llm
from mmadapt.model import MultimodalLM


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the BLSP-KD recipe, e.g. configs/blsp_kd.yaml")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="continuation length cap")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--force", action="store_true", help="regenerate records that already have a response")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    loaded = load_llm(cfg.model.llm, seed=cfg.train.seed)
    teacher = MultimodalLM(loaded.model.eval(), loaded.tokenizer, {}, {})
    for path in filter(None, [cfg.data.train, cfg.data.eval]):
        written = fill_responses(Path(path), teacher, cfg, args)
        print(f"{path}: wrote {written} responses", file=sys.stderr)
    return 0


def fill_responses(path: Path, teacher: MultimodalLM, cfg, args) -> int:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    todo = [r for r in records if args.force or not r.get("response")]
    for start in tqdm(range(0, len(todo), args.batch_size), desc=f"responses for {path.name}"):
        batch = todo[start : start + args.batch_size]
        for record, response in zip(batch, generate(teacher, cfg, [r["transcript"] for r in batch], args.max_new_tokens)):
            record["response"] = response
    write_jsonl(path, records)
    return len(todo)


@torch.no_grad()
def generate(teacher: MultimodalLM, cfg, transcripts: list[str], max_new_tokens: int) -> list[str]:
    tokenizer = teacher.tokenizer
    prompts = [
        torch.tensor(distillation_prompt(tokenizer, t, cfg.data.speech_prompt, cfg.data.system_prompt))
        for t in transcripts
    ]
    ids = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True, padding_value=tokenizer.pad_token_id, padding_side="left")
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(p) for p in prompts], batch_first=True, padding_side="left")
    tokens = teacher.generate(ids, mask, max_new_tokens=max_new_tokens)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens]


if __name__ == "__main__":
    sys.exit(main())
