"""MultimodalLM: an unmodified HF causal LM fed with encoded images between text tokens.

::

    pixels [N,3,H,W] --encoder--> [N,n,E] --projector--> [N,n,D] ---------.
                                                                           v  masked_scatter
    input_ids [B,T] (-1 = image slot) --embed(ids >= 0)--> [B,T,D] --> inputs_embeds [B,T,D]
    modality_ids = (-input_ids).clamp(min=0)  --modality context-->  adapters in the LLM
    inputs_embeds --LLM decoder--> hidden [B,T,D] --lm_head on labelled rows only--> loss

Example::

    model = mmadapt.build_model(mmadapt.load_config("configs/xcomposer.yaml", ["model=models/tiny.yaml"]))
    out = model(input_ids=ids, attention_mask=mask, images=pixels, labels=labels)
    out.loss.backward()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .compat import cache_argument
from .encoders.cformer import quantity_loss as cif_quantity_loss
from .errors import InputError
from .losses import (
    IGNORE,
    distillation_kl,
    embedding_readout,
    first_answer_tokens,
    next_token_loss,
    predicting_positions,
    top1_agreement,
)
from .modality import IMAGE, SPEECH, attach_context, disable_adapters, modality_ids

GROUPS = ("adapters", "projector", "vision", "speech", "llm")
# Cosine logits over a 50k vocabulary need a sharp softmax before the right word can win.
READOUT_TEMPERATURE = 0.05


@dataclass(frozen=True)
class DistillSettings:
    """BLSP-KD weights (the ``loss`` config section): total = Σ weight · part."""

    temperature: float = 2.0
    kd: float = 1.0
    input_kl: float = 1.0
    quantity: float = 1.0


@dataclass
class MultimodalOutput(CausalLMOutputWithPast):
    """A causal-LM output plus the named loss parts and eval counts of the BLSP-KD recipe.

    ``parts``: ``{"kd": tensor, ...}`` logged as ``loss_<name>``; ``counts``:
    ``{"kd_top1": (hits, total), "cif_len_within1": (hits, total)}``.
    """

    parts: dict[str, torch.Tensor] | None = None
    counts: dict[str, tuple[int, int]] | None = None


@dataclass
class SpeechBatch:
    """Padded log-mel features of every speech item of a batch, in slot order.

    ``features``: ``[N, mels, F]``; ``frames``: ``[N]`` real frame counts;
    ``targets``: ``[N]`` transcript token counts (training forces CIF to them), or None.
    """

    features: torch.Tensor
    frames: torch.Tensor
    targets: torch.Tensor | None = None


class MultimodalLM(nn.Module):
    """An LLM plus encoders and projectors keyed by modality name (``image``, ``speech``)."""

    def __init__(self, llm: nn.Module, tokenizer, encoders: dict[str, nn.Module], projectors: dict[str, nn.Module]):
        super().__init__()
        self.llm = llm
        self.encoders = nn.ModuleDict(encoders)
        self.projectors = nn.ModuleDict(projectors)
        self.tokenizer = tokenizer
        self.distill = DistillSettings()
        self.image_alignment = "readout"
        self.readout_negatives: int | None = None
        attach_context(llm)

    def embed(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        speech_tokens: list[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Input embeddings with encoded items in their slots.

        Image slots (``-1``) are filled in place. Each speech slot (``-2``) stands for one
        speech item whose length is known only after CIF, so it is expanded to that
        item's tokens and the sequence, attention mask and labels grow accordingly.

        Returns:
            ``(embeds [B, T', D], modality_ids [B, T'], attention_mask, labels)``.
        """
        modality = (-input_ids).clamp(min=0)
        embeds = self.llm.get_input_embeddings()(input_ids.clamp(min=0))  # (B, T, D)
        embeds = self._fill_images(embeds, modality == IMAGE, images)
        speech_slots = int((modality == SPEECH).sum())
        if speech_slots != len(speech_tokens or []):
            raise InputError(f"the batch has {speech_slots} speech slots but {len(speech_tokens or [])} speech items")
        if not speech_slots:
            return embeds, modality, attention_mask, labels
        return _expand_speech(embeds, modality, attention_mask, labels, speech_tokens)

    def _fill_images(self, embeds: torch.Tensor, slots: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        if images is None or len(images) == 0:
            if slots.any():
                raise InputError(f"the batch has {int(slots.sum())} image slots but no images")
            return embeds
        tokens = self.encode_images(images)  # (N, n, D)
        if int(slots.sum()) != tokens.shape[0] * tokens.shape[1]:
            raise InputError(
                f"the batch has {int(slots.sum())} image slots but {tokens.shape[0]} images "
                f"x {tokens.shape[1]} tokens each"
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), tokens.to(embeds.dtype))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels ``[N, 3, H, W]`` -> projected image tokens ``[N, n, D]``."""
        encoder = self.encoders["image"]
        pixels = images.to(next(encoder.parameters()).dtype)  # bf16 engines cast weights, not inputs
        return self.projectors["image"](encoder(pixels))

    def encode_speech(self, speech: SpeechBatch):
        """Log-mel features -> encoder frames -> CFormer tokens projected to the LLM width.

        In training mode the CIF token count of item i is forced to ``speech.targets[i]``
        (one token per transcript token); in eval mode it is the encoder's own estimate.

        Returns:
            The CFormer's ``CifOutput``: ``tokens [N, n_max, D]``, ``lengths [N]``, ``alpha_sum [N]``.
        """
        encoder = self.encoders["speech"]
        features = speech.features.to(next(encoder.parameters()).dtype)
        hidden, frame_mask = encoder([f[:, :n] for f, n in zip(features, speech.frames.tolist())])
        targets = speech.targets if self.training else None
        return self.projectors["speech"](hidden, frame_mask, targets)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_frames: torch.Tensor | None = None,
        speech_lengths: torch.Tensor | None = None,
        teacher_input_ids: torch.Tensor | None = None,
        teacher_attention_mask: torch.Tensor | None = None,
        teacher_labels: torch.Tensor | None = None,
        return_logits: bool = True,
        align: bool = False,
    ) -> MultimodalOutput:
        """Run the LLM on text + image + speech tokens.

        Args:
            input_ids: ``[B, T]``; ``-1`` marks image-token slots, ``-2`` one slot per speech item.
            attention_mask: ``[B, T]``, 1 on real tokens.
            images: ``[N, 3, H, W]`` for every image of the batch in slot order.
            labels: ``[B, T]`` with ``-100`` where no loss is taken.
            audio_features: ``[M, mels, F]`` log-mel features of every speech item in slot order.
            audio_frames: ``[M]`` real frame counts of ``audio_features``.
            speech_lengths: ``[M]`` transcript token counts (BLSP-KD targets for CIF).
            teacher_input_ids: ``[B, T_t]`` the teacher's input (transcript in place of the
                speech); given, the loss is the BLSP-KD objective instead of cross-entropy.
            teacher_attention_mask: ``[B, T_t]``.
            teacher_labels: ``[B, T_t]`` the continuation's labels in the teacher's sequence.
            return_logits: with labels, False skips the full ``[B, T, V]`` logits; the loss then
                runs the LM head only on labelled positions.
            align: instead of the LM loss, the cheap alignment loss of the batch's modality
                (no LLM pass).

        Returns:
            :class:`MultimodalOutput` with ``loss`` (when labels), ``logits``, ``parts``, ``counts``.
        """
        speech = None if audio_features is None else SpeechBatch(audio_features, audio_frames, speech_lengths)
        if align:
            if speech is not None:
                return self._speech_alignment(input_ids, attention_mask, speech, teacher_input_ids)
            return MultimodalOutput(loss=self.alignment_loss(input_ids, images, labels))
        cif = None if speech is None else self.encode_speech(speech)
        speech_tokens = None if cif is None else _per_item(cif)
        embeds, modality, attention_mask, labels = self.embed(input_ids, images, speech_tokens, attention_mask, labels)
        if self.training and torch.is_grad_enabled() and not embeds.requires_grad:
            # Reentrant checkpointing only backpropagates into layers whose inputs need grad.
            embeds.requires_grad_(True)
        if teacher_input_ids is not None:
            teacher = (teacher_input_ids, teacher_attention_mask, teacher_labels)
            return self._distill(embeds, modality, attention_mask, labels, teacher, cif, speech)
        with modality_ids(self.llm, modality):
            if labels is None or return_logits:
                out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
                loss = None if labels is None else next_token_loss(out.logits, labels)
                return MultimodalOutput(loss=loss, logits=out.logits)
            hidden = self.llm.base_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        return MultimodalOutput(loss=self._labelled_loss(hidden.last_hidden_state, labels))

    def _labelled_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        keep = predicting_positions(labels)
        logits = self.llm.get_output_embeddings()(hidden[keep])  # (N_labelled, V)
        return F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]])

    def _distill(self, embeds, modality, attention_mask, labels, teacher, cif, speech):
        """BLSP-KD: the student (speech tokens, adapters on) matches the teacher (transcript,
        adapters off, no autograd) on the continuation and, when CIF gave one token per
        transcript token, on the speech span."""
        settings = self.distill
        teacher_input_ids, teacher_attention_mask, teacher_labels = teacher
        with modality_ids(self.llm, modality):
            student = self.llm.base_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        with torch.no_grad(), disable_adapters(self.llm):
            teacher = self.llm.base_model(
                inputs_embeds=self.llm.get_input_embeddings()(teacher_input_ids),
                attention_mask=teacher_attention_mask,
                use_cache=False,
            )
        head = self.llm.get_output_embeddings()
        student_rows = head(student.last_hidden_state[predicting_positions(labels)])
        teacher_rows = head(teacher.last_hidden_state[predicting_positions(teacher_labels)])
        parts = {"kd": distillation_kl(student_rows, teacher_rows, settings.temperature)}
        counts = {"kd_top1": top1_agreement(student_rows, teacher_rows)}
        if student.last_hidden_state.shape == teacher.last_hidden_state.shape:
            span = modality == SPEECH
            parts["input_kl"] = distillation_kl(
                head(student.last_hidden_state[span]), head(teacher.last_hidden_state[span]), settings.temperature
            )
        if speech.targets is not None:
            parts["quantity"] = cif_quantity_loss(cif.alpha_sum, speech.targets, self._cif_threshold)
            within = (cif.alpha_sum.detach().div(self._cif_threshold).round() - speech.targets).abs() <= 1
            counts["cif_len_within1"] = (int(within.sum()), within.numel())
        loss = sum(getattr(settings, name) * value for name, value in parts.items())
        return MultimodalOutput(loss=loss, parts=parts, counts=counts)

    def alignment_loss(self, input_ids: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The cheap first stage for image encoders trained from scratch (no LLM pass): it
        puts image tokens where the frozen LLM can read them, near the input embeddings of
        the words that describe the image. ``self.image_alignment`` picks the loss:

        - ``readout``: image token i of a single-image sample is read, by cosine against the
          LLM's input embedding table, as token i of the sample's first answer (tokens past
          the answer's end are free). The tokens then spell the caption in order, which
          keeps which colour goes with which shape, and where. Multi-image samples are skipped.
        - ``contrastive``: each sample's mean image token against the mean input embedding
          of its answer tokens, across the batch (CLIP-style). Order-blind: "a red circle and
          a blue square" has the same mean as "a blue circle and a red square".
        """
        tokens = self.encode_images(images)  # (N, n, D)
        per_sample = (input_ids == -IMAGE).sum(1) // tokens.shape[1]  # images per sample
        owner = torch.repeat_interleave(torch.arange(len(input_ids), device=input_ids.device), per_sample)
        if self.image_alignment == "readout":
            targets = first_answer_tokens(labels, tokens.shape[1])[owner]  # (N, n)
            targets[per_sample[owner] != 1] = IGNORE
            return self._readout(tokens, targets)
        has_image = per_sample > 0
        image = torch.zeros(len(input_ids), tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
        image = image.index_add(0, owner, tokens.mean(1))[has_image] / per_sample[has_image, None]
        embed = self.llm.get_input_embeddings()
        answer = labels != IGNORE
        with torch.no_grad():  # the words are the fixed target, even where the LLM trains
            text = torch.stack([embed(ids[keep]).mean(0) for ids, keep in zip(labels[has_image], answer[has_image])])
        logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T / 0.07  # (B', B')
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def _readout(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        table = self.llm.get_input_embeddings().weight
        return embedding_readout(tokens, targets, table, READOUT_TEMPERATURE, self.readout_negatives)

    @property
    def _cif_threshold(self) -> float:
        return self.projectors["speech"].cformer.cfg.threshold

    def _speech_alignment(self, input_ids, attention_mask, speech: SpeechBatch, teacher_input_ids) -> MultimodalOutput:
        """Cheap first BLSP stage, no LLM pass: each CIF token (count forced to the
        transcript's) is read, through the LLM's input embedding table, as its transcript token."""
        cif = self.encode_speech(speech)
        speech_tokens = _per_item(cif)
        _, modality, _, _ = self.embed(input_ids, None, speech_tokens, attention_mask)
        transcript = teacher_input_ids[modality == SPEECH]  # (ΣN,) the token each CIF token stands for
        parts = {
            "align": self._readout(torch.cat(speech_tokens), transcript),
            "quantity": cif_quantity_loss(cif.alpha_sum, speech.targets, self._cif_threshold),
        }
        return MultimodalOutput(loss=parts["align"] + self.distill.quantity * parts["quantity"], parts=parts)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_frames: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        use_cache: bool = True,
        on_token: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Decode after a left-padded prompt; returns new tokens ``[B, <= max_new_tokens]``.

        Prompt image positions keep their adapter effect through the KV cache; every
        generated token is text. Rows that finished are padded with the EOS id and leave
        the forwards (unless every row of this rank finished while another rank's did not).
        ``on_token``, when given, is called with each new token ``[B]`` as it is chosen
        (for streaming).
        """
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        speech_tokens = None
        if audio_features is not None:
            cif = self.encode_speech(SpeechBatch(audio_features, audio_frames))
            speech_tokens = _per_item(cif)
        embeds, modality, mask = _left_aligned(*self.embed(input_ids, images, speech_tokens, mask)[:3])
        eos = self.tokenizer.eos_token_id
        cache = DynamicCache() if use_cache else None
        logits = self._step(embeds, modality, mask, cache)
        finished = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        rows = torch.arange(len(input_ids), device=input_ids.device)  # (R,) the batch rows still decoded
        new_tokens = []
        for _ in range(max_new_tokens):
            token = torch.full_like(finished, eos, dtype=torch.long)  # (B,)
            token[rows] = _choose(logits, do_sample, temperature)
            token = token.masked_fill(finished, eos)
            new_tokens.append(token)
            if on_token is not None:
                on_token(token)
            finished |= token == eos
            if _all_ranks_finished(finished):
                break
            live = ~finished[rows]  # (R,)
            if live.any() and not live.all():
                # A decode step costs per row on a CPU, so finished rows leave the forward and the cache.
                rows, mask = rows[live], mask[live]
                if use_cache:
                    cache.batch_select_indices(live)
                else:
                    embeds, modality = embeds[live], modality[live]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            token_embeds = self.llm.get_input_embeddings()(token[rows][:, None])
            if use_cache:
                logits = self._step(token_embeds, None, mask, cache)
            else:
                embeds = torch.cat([embeds, token_embeds], dim=1)
                modality = torch.cat([modality, torch.zeros_like(modality[:, :1])], dim=1)
                logits = self._step(embeds, modality, mask, None)
        return torch.stack(new_tokens, dim=1)

    def _step(self, embeds, modality, mask, cache) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1] :]
        with modality_ids(self.llm, modality):
            out = self.llm(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                use_cache=cache is not None,
                **{cache_argument(type(self.llm)): cache},
                logits_to_keep=1,  # only the last position chooses a token: no [B, T, V] prompt logits
            )
        return out.logits[:, -1].float()


    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """Every parameter by trainable group: adapters, projector, vision, speech, llm."""
        groups: dict[str, dict[str, nn.Parameter]] = {group: {} for group in GROUPS}
        for name, param in self.named_parameters():
            groups[_group_of(name)][name] = param
        return groups


def _group_of(name: str) -> str:
    if ".mmadapt." in name:
        return "adapters"
    if name.startswith("projectors."):
        return "projector"
    if name.startswith("encoders."):
        return "speech" if name.startswith("encoders.speech.") else "vision"
    return "llm"


def _per_item(cif) -> list[torch.Tensor]:
    """The CFormer's padded ``tokens [N, n_max, D]`` as one ``[n_i, D]`` tensor per speech item."""
    return [tokens[:n] for tokens, n in zip(cif.tokens, cif.lengths.tolist())]


def _expand_speech(
    embeds: torch.Tensor,
    modality: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    speech_tokens: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Replace each speech slot by its item's tokens, row by row, and pad again on the
    side the batch was padded (left when every row ends with a real token)."""
    mask = torch.ones_like(modality) if attention_mask is None else attention_mask
    left = bool(mask[:, -1].all()) and not bool(mask[:, 0].all())
    items = iter(speech_tokens)
    rows: dict[str, list[torch.Tensor]] = {"embeds": [], "modality": [], "labels": []}
    for b in range(len(modality)):
        real = mask[b].bool()
        slots = modality[b][real] == SPEECH
        tokens = [next(items) for _ in range(int(slots.sum()))]
        repeats = torch.ones_like(modality[b][real])
        repeats[slots] = torch.tensor([len(t) for t in tokens], device=repeats.device, dtype=repeats.dtype)
        source = torch.repeat_interleave(torch.arange(len(repeats), device=repeats.device), repeats)
        row_modality = modality[b][real][source]
        row_embeds = embeds[b][real][source]
        if tokens:
            row_embeds = row_embeds.masked_scatter((row_modality == SPEECH)[:, None], torch.cat(tokens).to(row_embeds.dtype))
        rows["embeds"].append(row_embeds)
        rows["modality"].append(row_modality)
        if labels is not None:
            rows["labels"].append(labels[b][real][source])
    side = "left" if left else "right"
    new_mask = _pad([torch.ones_like(m) for m in rows["modality"]], 0, side)
    new_labels = _pad(rows["labels"], IGNORE, side) if labels is not None else None
    return _pad(rows["embeds"], 0.0, side), _pad(rows["modality"], 0, side), new_mask, new_labels


def _pad(rows: list[torch.Tensor], value: float, side: str) -> torch.Tensor:
    return pad_sequence(rows, batch_first=True, padding_value=value, padding_side=side)


def _left_aligned(
    embeds: torch.Tensor, modality: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows rolled so every prompt ends at the last column, as decoding appends there.

    A left-padded batch whose prompts all had the same token count has no padding
    before speech expansion, which then pads it on the right (the side it cannot tell
    from training's); rolling each row by its trailing padding makes it left-padded.
    """
    trailing = (mask.flip(1).cumsum(1) == 0).sum(1)  # (B,) padding columns after each prompt
    if not bool(trailing.any()):
        return embeds, modality, mask
    columns = torch.arange(mask.shape[1], device=mask.device)
    source = (columns[None] - trailing[:, None]) % mask.shape[1]  # (B, T) row b, column t <- t - trailing[b]
    embeds = embeds.gather(1, source[..., None].expand_as(embeds))
    return embeds, modality.gather(1, source), mask.gather(1, source)


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    return torch.multinomial(F.softmax(logits / temperature, dim=-1), 1).squeeze(1)


def _all_ranks_finished(finished: torch.Tensor) -> bool:
    """Under ZeRO-3 every rank must run the same number of forwards, so stop together."""
    done = finished.all().to(torch.int32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
    return bool(done)
