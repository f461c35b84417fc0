"""One training loop for every recipe, on a DeepSpeed engine.

Reads top to bottom: setup (trainable parts, optimizer, schedule, engine, resume)
-> train (accumulate, step, log, eval, checkpoint) -> export. Works for ZeRO 0-3,
one process or many, CPU (gloo) or GPU.
"""

from __future__ import annotations

import functools
import json
import math
import resource
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import checkpoint, distributed
from .adapters import adapters_of
from .compat import set_activation_checkpointing
from .config import Config, TrainConfig
from .data.collate import Collator
from .errors import InputError
from .export import gathered_state, save_adapter
from .evaluate import evaluation, model_inputs
from .hooks import TrainingHooks, gradient_hooks
from .model import MultimodalLM
from .optim import build_optimizer


class Trainer:
    """Trains ``model`` on ``train_set`` as configured; evaluates on ``eval_sets``.

    Args:
        cfg: the validated config.
        model: the built model (adapters injected, nothing trainable yet).
        train_set: items of ``mmadapt.data.ConversationDataset``.
        eval_sets: ``(loss_set, generation_set)`` from the eval file, or None.
    """

    def __init__(self, cfg: Config, model: MultimodalLM, train_set, eval_sets=None) -> None:
        self.cfg, self.model, self.train_set, self.eval_sets = cfg, model, train_set, eval_sets
        self.out = Path(cfg.train.output_dir)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.stop_requested = False
        self.collate_train = Collator(model.tokenizer.pad_token_id, padding_side="right")
        self.hooks = TrainingHooks(model, cfg.train.seed)

    # ---- setup -------------------------------------------------------------------------
    def setup(self, resume_from: Path | None) -> None:
        import deepspeed

        self.hooks.check_zero_stage(self.cfg.deepspeed.zero_stage)
        groups = self._set_trainable()
        n_trainable = sum(p.numel() for g in groups.values() for p in g.values())
        if self.cfg.train.gradient_checkpointing:
            set_activation_checkpointing(self.model.llm, use_reentrant=False)
        optimizer = self._optimizer(groups)
        self.lr_cycle = self.hooks.lr_cycle()
        factor = functools.partial(lr_factor, train=self.cfg.train, cycle=self.lr_cycle)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        self.engine, self.optimizer, _, self.schedule = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=schedule, config=self._deepspeed_config()
        )
        torch.manual_seed(self.cfg.train.seed * 1000 + self.rank)  # dropout; a resume restores it
        self.step = checkpoint.load(self.engine, resume_from) if resume_from else 0
        if self.rank == 0:
            self._truncate_metrics(self.step)
            tqdm.write(f"trainable parameters: {n_trainable:,} in {', '.join(sorted(groups))}")

    def _set_trainable(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        groups = self.model.parameter_groups()
        for group, params in groups.items():
            for param in params.values():
                param.requires_grad_(group in self.cfg.train.trainable)
        chosen = {g: groups[g] for g in self.cfg.train.trainable if groups[g]}
        if not chosen:
            raise ValueError(f"train.trainable={self.cfg.train.trainable} selects no parameters of this model")
        return chosen

    def _optimizer(self, groups: dict[str, dict[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
        train = self.cfg.train
        param_groups = []
        for group, params in groups.items():
            lr = train.lr * train.lr_scale.get(group, 1.0)
            matrices = [p for p in params.values() if p.dim() >= 2]
            vectors = [p for p in params.values() if p.dim() < 2]
            param_groups += [
                {"params": matrices, "lr": lr, "weight_decay": train.weight_decay},
                {"params": vectors, "lr": lr, "weight_decay": 0.0},
            ]
        param_groups = [g for g in param_groups if g["params"]]
        name = self._optimizer_name()
        if self.cfg.deepspeed.offload_optimizer:
            if name != "adamw":
                raise InputError(f"deepspeed.offload_optimizer uses DeepSpeedCPUAdam; train.optimizer={name} cannot offload")
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(param_groups, lr=train.lr, adamw_mode=True)
        return build_optimizer(name, param_groups, self.model, train.optimizer_args, self.cfg.deepspeed.zero_stage)

    def _optimizer_name(self) -> str:
        """``train.optimizer``, or the optimizer the adapters' method needs (LoRA-Pro's)."""
        needed = {a.optimizer for _, a in adapters_of(self.model) if a.optimizer}
        chosen = self.cfg.train.optimizer
        if len(needed) > 1 or (needed and chosen not in needed | {"adamw"}):
            raise InputError(f"train.optimizer={chosen}, but the adapters need the optimizer(s) {sorted(needed)}")
        return needed.pop() if needed else chosen

    def _deepspeed_config(self) -> dict:
        ds, train = self.cfg.deepspeed, self.cfg.train
        zero: dict = {"stage": ds.zero_stage}
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        config = {
            "train_micro_batch_size_per_gpu": train.batch_size,
            "gradient_accumulation_steps": train.grad_accum,
            "train_batch_size": train.batch_size * train.grad_accum * self.world,
            "gradient_clipping": train.max_grad_norm,
            "zero_optimization": zero,
            "bf16": {"enabled": train.precision == "bf16"},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
        }
        return {**config, **ds.extra}

    # ---- data --------------------------------------------------------------------------
    def _micro_batches(self, step: int) -> dict[str | None, Iterator[dict]]:
        """Endless micro-batches in a seeded order, per data split (None: no splits), from ``step`` on."""
        fractions = self.hooks.data_splits()
        accum, align_steps = self.cfg.train.grad_accum, self.cfg.train.align_steps
        if fractions is None:
            return {None: self._loader(range(len(self.train_set)), step * accum, align_steps * accum)}
        splits = split_indices(len(self.train_set), fractions, self.cfg.train.seed)
        return {
            name: self._loader(
                indices, self._steps_in_split(name, step) * accum, self._steps_in_split(name, align_steps) * accum
            )
            for name, indices in splits.items()
        }

    def _steps_in_split(self, name: str, step: int) -> int:
        return sum(self.hooks.context(s).split == name for s in range(step))

    def _loader(self, indices, start: int, aligning: int) -> Iterator[dict]:
        """Micro-batches over ``indices`` of the train set; ``start`` skips those already
        consumed, the first ``aligning`` belong to the alignment stage."""
        lengths = [self.train_set.lengths[i] for i in indices]
        local = _rank_batches(lengths, self.cfg, self.rank, self.world, start, aligning)
        sampler = [[indices[i] for i in batch] for batch in local]
        loader = DataLoader(
            self.train_set,
            batch_sampler=sampler,
            collate_fn=self.collate_train,
            num_workers=self.cfg.data.num_workers,
            generator=torch.Generator().manual_seed(self.cfg.train.seed),  # keeps the global RNG untouched
        )
        return iter(loader)

    # ---- train -------------------------------------------------------------------------
    def train(self) -> None:
        """Run until ``train.max_steps``, then export; Ctrl-C or SIGTERM checkpoints and stops."""
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            with gradient_hooks(self.hooks):
                self._train_loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _train_loop(self) -> None:
        train = self.cfg.train
        batches = self._micro_batches(self.step)
        bar = tqdm(total=train.max_steps, initial=self.step, disable=self.rank != 0, desc="train", dynamic_ncols=True)
        self.engine.train()
        while self.step < train.max_steps and not self._stop_agreed():
            row = self._train_step(batches)
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            if self.step % train.log_every == 0 or self.step == train.max_steps:
                self._log(row)
            if train.eval_every and self.step % train.eval_every == 0 and self.step < train.max_steps:
                self.evaluate()
            if train.save_every and self.step % train.save_every == 0:
                checkpoint.save(self.engine, self.out, self.step, train.keep_last)
        bar.close()
        if self.step < train.max_steps:  # stopped by a signal: save what we have and leave
            checkpoint.save(self.engine, self.out, self.step, train.keep_last)
            return
        if self.eval_sets is not None:
            self.evaluate()
        if not train.save_every or self.step % train.save_every:
            checkpoint.save(self.engine, self.out, self.step, train.keep_last)
        self.export()

    def _train_step(self, batches: dict[str | None, Iterator[dict]]) -> dict:
        started = time.perf_counter()
        lr = self.cfg.train.lr * lr_factor(self.step, self.cfg.train, self.lr_cycle)
        align = self.step < self.cfg.train.align_steps
        ctx = self.hooks.context(self.step, self.engine.optimizer)
        totals: dict[str, float] = {"loss": 0.0, "tokens": 0, "samples": 0}
        for micro in range(self.cfg.train.grad_accum):
            batch = _to_device(next(batches[ctx.split]))
            out = self.engine(**model_inputs(batch), return_logits=False, align=align)
            parts = out.parts or ({"align": out.loss} if align else {})
            regulariser = self.hooks.extra_loss(ctx)
            loss = out.loss if regulariser is None else out.loss + regulariser
            if regulariser is not None:
                parts = {**parts, "reg": regulariser}
            self.engine.backward(loss)
            last = micro == self.cfg.train.grad_accum - 1
            if last:
                self.hooks.before_step(ctx)
            self.engine.step()
            if last:
                self.hooks.after_step(ctx)
            for name, value in {"loss": loss, **{f"loss_{n}": v for n, v in parts.items()}}.items():
                totals[name] = totals.get(name, 0.0) + value.item()
            totals["tokens"] += _llm_tokens(batch)
            totals["samples"] += len(batch["input_ids"])
        totals = dict(zip(totals, distributed.all_sum(list(totals.values()))))
        seconds = time.perf_counter() - started
        micro_batches = self.cfg.train.grad_accum * self.world
        return {
            "step": self.step + 1,
            **{name: value / micro_batches for name, value in totals.items() if name.startswith("loss")},
            "lr": lr,
            "tokens_per_s": totals["tokens"] / seconds,
            "samples_per_s": totals["samples"] / seconds,
            "peak_mem_mb": _peak_memory_mb(),
        }

    # ---- eval --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss and the recipe's task metrics; logged as an eval row."""
        self.engine.eval()
        row = {"step": self.step, **evaluation(self.engine, self.model, self.eval_sets, self.cfg)}
        self.engine.train()
        self._log(row)
        return row

    # ---- output ------------------------------------------------------------------------
    def export(self) -> None:
        """Gather every trained tensor to rank 0 and write ``OUT/adapter/``."""
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        names |= {f"{a}.{b}" for a, adapter in adapters_of(self.model) for b, _ in adapter.named_buffers()}
        state = gathered_state(self.model, names)
        if self.rank == 0:
            meta = {
                "preset": self.cfg.preset,
                "base_fingerprint": self.model.base_fingerprint,
                "trainable": self.cfg.train.trainable,
                "adapters": self.cfg.adapters,
                "step": self.step,
            }
            save_adapter(state, self.out, meta)
        distributed.barrier()

    def _log(self, row: dict) -> None:
        if self.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()

    @property
    def writer(self):
        if not hasattr(self, "_writer"):
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / "tensorboard")) if self.rank == 0 else None
        return self._writer

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop rows after the checkpoint so the file reads as one run."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(row + "\n" for row in rows))

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True

    def _stop_agreed(self) -> bool:
        return bool(distributed.all_sum([float(self.stop_requested)])[0])


def lr_factor(step: int, train: TrainConfig, cycle: int | None = None) -> float:
    """Linear warm-up to 1, then cosine down to ``train.min_lr_ratio`` at ``max_steps``;
    with ``cycle``, the same shape over each ``cycle`` steps (restarted schedule)."""
    length = cycle or train.max_steps
    if cycle:
        step %= cycle
    if step < train.warmup_steps:
        return (step + 1) / (train.warmup_steps + 1)
    progress = (step - train.warmup_steps) / max(1, length - train.warmup_steps)
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _rank_batches(
    lengths: list[int], cfg: Config, rank: int, world: int, start: int, aligning: int = 0
) -> Iterator[list[int]]:
    """Index lists for this rank's micro-batches in a seeded order; ``start`` skips consumed ones.

    The first ``aligning`` micro-batches (the alignment stage) are grouped by length only
    with ``data.group_alignment_by_length``: that stage runs no LLM, so padding costs
    little there (nothing for images), and batches of one caption length train the image
    encoder worse (shapes readout loss 1.40 vs 0.87, mean over steps 150-200). An epoch that
    straddles the stage change switches order at the change.
    """
    size = cfg.train.batch_size
    per_epoch = len(lengths) // (size * world)
    if per_epoch == 0:
        raise ValueError(f"data.train has {len(lengths)} usable records, fewer than one global batch ({size * world})")
    orders: dict[tuple[int, bool], list[int]] = {}
    for index in range(start, cfg.train.max_steps * cfg.train.grad_accum):
        epoch, position = divmod(index, per_epoch)
        key = (epoch, cfg.data.group_by_length and (index >= aligning or cfg.data.group_alignment_by_length))
        if key not in orders:
            orders = {key: _epoch_order(lengths, size * world, key[1], cfg.train.seed * 1000 + epoch)}
        begin = (position * world + rank) * size
        yield orders[key][begin : begin + size]


def split_indices(n: int, fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Disjoint index lists of ``range(n)`` by name, sized by ``fractions``, in a seeded draw."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + 7)).tolist()
    total = sum(fractions.values())
    splits, begin, cumulative = {}, 0, 0.0
    for name, fraction in fractions.items():
        cumulative += fraction
        end = round(n * cumulative / total)
        splits[name] = order[begin:end]
        begin = end
    return splits


def _epoch_order(lengths: list[int], global_batch: int, group_by_length: bool, seed: int) -> list[int]:
    """A permutation; grouped by length, each global batch holds neighbours in length (less padding)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return order
    chunk = global_batch * 64
    order = [i for s in range(0, len(order), chunk) for i in sorted(order[s : s + chunk], key=lengths.__getitem__)]
    batches = [order[s : s + global_batch] for s in range(0, len(order) - global_batch + 1, global_batch)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [i for b in shuffled for i in batches[b]]


def _llm_tokens(batch: dict) -> int:
    """Non-padding tokens entering the LLM: each speech slot stands for its CIF tokens."""
    expansion = int(batch["speech_lengths"].sum()) - len(batch["speech_lengths"]) if "speech_lengths" in batch else 0
    return int(batch["attention_mask"].sum()) + expansion


def _to_device(batch: dict) -> dict:
    device = distributed.device()
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
