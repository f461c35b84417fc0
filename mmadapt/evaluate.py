"""Held-out evaluation shared by the trainer and ``mmadapt eval``: loss and the task metric.

Every rank walks its share of the eval set in the same number of batches, because
under ZeRO-3 each forward is a collective; ranks without data run a dummy batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from . import distributed
from .config import Config, EvalConfig
from .data.collate import Collator
from .metrics import metric
from .model import IGNORE, MultimodalLM


def rank_batches(dataset, collate: Collator, batch_size: int) -> Iterator[dict]:
    """This rank's share of ``dataset`` in batches; ``batch["real"]`` is 0 on padding batches."""
    rank, world = distributed.rank(), distributed.world_size()
    indices = list(range(rank, len(dataset), world))
    for start in range(0, math.ceil(len(dataset) / world), batch_size):
        chunk = indices[start : start + batch_size]
        batch = collate([dataset[i] for i in (chunk or [0])])
        batch["references"] = [dataset[i].get("reference") for i in chunk]
        batch["real"] = int(bool(chunk))
        device = distributed.device()
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


MODEL_INPUTS = (
    "input_ids", "attention_mask", "images", "labels", "audio_features", "audio_frames", "speech_lengths",
    "teacher_input_ids", "teacher_attention_mask", "teacher_labels",
)


GENERATION_INPUTS = ("input_ids", "attention_mask", "images", "audio_features", "audio_frames")


def model_inputs(batch: dict) -> dict:
    """The keys of a collated batch that ``MultimodalLM.forward`` takes."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def generation_inputs(batch: dict) -> dict:
    """The keys of a collated prompt batch that ``MultimodalLM.generate`` takes (absent items dropped)."""
    return {k: batch[k] for k in GENERATION_INPUTS if batch.get(k) is not None}


def evaluation(forward: nn.Module, model: MultimodalLM, eval_sets: tuple, cfg: Config) -> dict:
    """The eval row of the recipe: ``eval_loss`` plus ``eval_accuracy`` (SFT) or
    ``eval_kd_top1`` and ``eval_cif_len_within1`` (BLSP-KD)."""
    loss_set, generation_set = eval_sets
    pad = model.tokenizer.pad_token_id
    if cfg.loss.type == "blsp_kd":
        return distillation_metrics(forward, loss_set, pad, cfg.eval)
    return {
        "eval_loss": eval_loss(forward, loss_set, pad, cfg.eval),
        "eval_accuracy": task_accuracy(model, generation_set, cfg.eval),
    }


@torch.no_grad()
def distillation_metrics(forward: nn.Module, dataset, pad_token_id: int, cfg: EvalConfig) -> dict:
    """BLSP-KD on held-out utterances with the CIF count the model estimates itself:
    the KD loss, how often the student's top-1 next token equals the teacher's on the
    continuation, and how often the CIF token count is within one of the transcript's."""
    loss_sum, kd_rows, top1, cif_within, utterances = 0.0, 0, 0, 0, 0
    for batch in rank_batches(dataset, Collator(pad_token_id, padding_side="right"), cfg.batch_size):
        out = forward(**model_inputs(batch), return_logits=False)
        real = batch["real"]
        hits, rows = out.counts["kd_top1"]
        within, items = out.counts["cif_len_within1"]
        loss_sum += out.parts["kd"].item() * rows * real
        kd_rows, top1 = kd_rows + rows * real, top1 + hits * real
        cif_within, utterances = cif_within + within * real, utterances + items * real
    loss_sum, kd_rows, top1, cif_within, utterances = distributed.all_sum([loss_sum, kd_rows, top1, cif_within, utterances])
    return {
        "eval_loss": loss_sum / max(kd_rows, 1),
        "eval_kd_top1": top1 / max(kd_rows, 1),
        "eval_cif_len_within1": cif_within / max(utterances, 1),
    }


@torch.no_grad()
def eval_loss(forward: nn.Module, dataset, pad_token_id: int, cfg: EvalConfig) -> float:
    """Token-weighted cross-entropy on assistant text over the whole eval set (all ranks)."""
    loss_sum, token_count = 0.0, 0
    for batch in rank_batches(dataset, Collator(pad_token_id, padding_side="right"), cfg.batch_size):
        loss = forward(**model_inputs(batch), return_logits=False).loss.item()
        n = int((batch["labels"][:, 1:] != IGNORE).sum()) * batch["real"]
        loss_sum, token_count = loss_sum + loss * n, token_count + n
    loss_sum, token_count = distributed.all_sum([loss_sum, token_count])
    return loss_sum / max(token_count, 1)


@torch.no_grad()
def task_accuracy(model: MultimodalLM, dataset, cfg: EvalConfig) -> float:
    """Fraction of prompts whose greedy answer satisfies ``cfg.metric`` against the reference."""
    score = metric(cfg.metric)
    collate = Collator(model.tokenizer.pad_token_id, padding_side="left")
    correct, total = 0, 0
    for batch in rank_batches(dataset, collate, cfg.batch_size):
        generated = model.generate(**generation_inputs(batch), max_new_tokens=cfg.max_new_tokens)
        if not batch["real"]:
            continue
        for tokens, reference in zip(generated, batch["references"]):
            correct += int(score(model.tokenizer.decode(tokens, skip_special_tokens=True), reference))
            total += 1
    correct, total = distributed.all_sum([correct, total])
    return correct / max(total, 1)
