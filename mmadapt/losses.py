"""Training losses on logits and embeddings: SFT cross-entropy, the BLSP-KD parts, and
the alignment stage's readout (encoder token i read as word i through the LLM's own
input embedding table, so the frozen LLM can read the tokens from the first LM step).

BLSP-KD (speech -> text distillation): the teacher is the LLM with adapters off,
fed the transcript; the student is the same LLM fed the speech tokens (PLoRA on).
Both see the same prompt and the same continuation (``response``), so their
next-token predictions pair up position by position on the continuation
(``kd_loss``) and, when the speech gives one token per transcript token, on the
speech/transcript span as well (``input_kl``). The released BLSP code compares
distributions one position off; here both sides predict the same next token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t predicting token t+1 where labels are set."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """``BoolTensor[B, T]``: positions whose next token is labelled (they predict it)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of KL(teacher || student) at ``temperature``, scaled by T² (Hinton et al.).

    Both are ``[N, V]`` rows that predict the same token; zero when they are equal.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[int, int]:
    """How many rows have the same argmax, and how many rows there are."""
    same = student_logits.argmax(-1) == teacher_logits.argmax(-1)
    return int(same.sum()), same.numel()


def first_answer_tokens(labels: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]``: the first ``width`` tokens of each row's first labelled run (its first
    answer), ``IGNORE`` past the answer's end or where a row has no labels."""
    targets = torch.full((len(labels), width), IGNORE, dtype=labels.dtype, device=labels.device)
    for row, row_labels in enumerate(labels):
        labelled = (row_labels != IGNORE).nonzero().flatten()
        breaks = (labelled.diff() != 1).nonzero().flatten()
        answer = row_labels[labelled[: int(breaks[0]) + 1 if len(breaks) else len(labelled)]][:width]
        targets[row, : len(answer)] = answer
    return targets


def embedding_readout(
    tokens: torch.Tensor, targets: torch.Tensor, table: torch.Tensor, temperature: float, negatives: int | None = None
) -> torch.Tensor:
    """Cross-entropy of reading each token as its target word: softmax over the cosine
    similarities to every row of the embedding ``table`` (``[V, D]``, no gradient).

    ``tokens`` is ``[..., D]``, ``targets`` the matching ``[...]`` ids (``IGNORE`` skips a token).
    ``negatives``: the softmax runs over the targets' rows plus this many rows drawn uniformly
    from the table (a sampled softmax: the ``[N, V]`` product is most of the loss's cost).
    Zero when no token has a target.
    """
    keep = targets != IGNORE
    if not keep.any():
        return tokens.sum() * 0.0
    tokens, targets, table = tokens[keep], targets[keep], table.detach()
    if negatives is not None and negatives < len(table):
        drawn = torch.randint(len(table), (negatives,), device=table.device)
        rows = torch.cat([targets, drawn]).unique()  # sorted, so searchsorted re-indexes the targets
        targets, table = torch.searchsorted(rows, targets), table[rows]
    logits = F.normalize(tokens.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T
    return F.cross_entropy(logits / temperature, targets)
