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

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .errors import InputError
from .modality import IMAGE, attach_context, modality_ids

IGNORE = -100
GROUPS = ("adapters", "projector", "vision", "speech", "llm")


class MultimodalLM(nn.Module):
    """An LLM plus encoders and projectors keyed by modality name (``image``, ``speech``)."""

    def __init__(self, llm: nn.Module, tokenizer, encoders: dict[str, nn.Module], projectors: dict[str, nn.Module]):
        super().__init__()
        self.llm = llm
        self.encoders = nn.ModuleDict(encoders)
        self.projectors = nn.ModuleDict(projectors)
        self.tokenizer = tokenizer
        attach_context(llm)

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings with encoded images in the ``-1`` slots; returns (embeds, modality_ids)."""
        modality = (-input_ids).clamp(min=0)
        embeds = self.llm.get_input_embeddings()(input_ids.clamp(min=0))  # (B, T, D)
        slots = modality == IMAGE
        if images is None or len(images) == 0:
            if slots.any():
                raise InputError(f"the batch has {int(slots.sum())} image slots but no images")
            return embeds, modality
        tokens = self.encode_images(images)  # (N, n, D)
        if int(slots.sum()) != tokens.shape[0] * tokens.shape[1]:
            raise InputError(
                f"the batch has {int(slots.sum())} image slots but {tokens.shape[0]} images "
                f"x {tokens.shape[1]} tokens each"
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), tokens.to(embeds.dtype)), modality

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels ``[N, 3, H, W]`` -> projected image tokens ``[N, n, D]``."""
        encoder = self.encoders["image"]
        pixels = images.to(next(encoder.parameters()).dtype)  # bf16 engines cast weights, not inputs
        return self.projectors["image"](encoder(pixels))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
        align: bool = False,
    ) -> CausalLMOutputWithPast:
        """Run the LLM on text + image tokens.

        Args:
            input_ids: ``[B, T]``; ``-1`` marks image-token slots (see ``mmadapt.data``).
            attention_mask: ``[B, T]``, 1 on real tokens.
            images: ``[N, 3, H, W]`` for every image of the batch in slot order.
            labels: ``[B, T]`` with ``-100`` where no loss is taken.
            return_logits: with labels, False skips the full ``[B, T, V]`` logits; the loss then
                runs the LM head only on labelled positions.
            align: instead of the LM loss, the cheap alignment loss of :meth:`alignment_loss`
                (no LLM pass).

        Returns:
            ``CausalLMOutputWithPast`` with ``loss`` (when labels) and ``logits``.
        """
        if align:
            return CausalLMOutputWithPast(loss=self.alignment_loss(input_ids, images, labels))
        embeds, modality = self.embed(input_ids, images)
        if self.training and torch.is_grad_enabled() and not embeds.requires_grad:
            # Reentrant checkpointing only backpropagates into layers whose inputs need grad.
            embeds.requires_grad_(True)
        with modality_ids(self.llm, modality):
            if labels is None or return_logits:
                out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
                loss = None if labels is None else next_token_loss(out.logits, labels)
                return CausalLMOutputWithPast(loss=loss, logits=out.logits)
            hidden = self.llm.base_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        return CausalLMOutputWithPast(loss=self._labelled_loss(hidden.last_hidden_state, labels))

    def _labelled_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][keep])  # (N_labelled, V)
        return F.cross_entropy(logits.float(), targets[keep])

    def alignment_loss(self, input_ids: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Contrastive loss pulling each sample's mean image token towards the mean input
        embedding of its labelled (answer) tokens, against the other samples of the batch.

        A cheap first stage for encoders trained from scratch: it needs no LLM pass, and
        afterwards image tokens already sit near the embeddings of the words that describe
        them, which the frozen LLM can read.
        """
        tokens = self.encode_images(images)  # (N, n, D)
        per_sample = (input_ids == -IMAGE).sum(1) // tokens.shape[1]  # images per sample
        owner = torch.repeat_interleave(torch.arange(len(input_ids), device=input_ids.device), per_sample)
        has_image = per_sample > 0
        image = torch.zeros(len(input_ids), tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
        image = image.index_add(0, owner, tokens.mean(1))[has_image] / per_sample[has_image, None]
        embed = self.llm.get_input_embeddings()
        answer = labels != IGNORE
        text = torch.stack([embed(ids[keep]).mean(0) for ids, keep in zip(labels[has_image], answer[has_image])])
        logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T / 0.07  # (B', B')
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Decode after a left-padded prompt; returns new tokens ``[B, <= max_new_tokens]``.

        Prompt image positions keep their adapter effect through the KV cache; every
        generated token is text. Rows that finished are padded with the EOS id.
        """
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        embeds, modality = self.embed(input_ids, images)
        eos = self.tokenizer.eos_token_id
        cache = DynamicCache() if use_cache else None
        logits = self._step(embeds, modality, mask, cache)
        finished = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for _ in range(max_new_tokens):
            token = _choose(logits, do_sample, temperature).masked_fill(finished, eos)  # (B,)
            new_tokens.append(token)
            finished |= token == eos
            if _all_ranks_finished(finished):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            token_embeds = self.llm.get_input_embeddings()(token[:, None])
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
                cache=cache,
                use_cache=cache is not None,
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


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t predicting token t+1 where labels are set."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


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
