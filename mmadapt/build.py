"""Builders: config -> MultimodalLM, and a finished run's folder -> trained MultimodalLM."""

from __future__ import annotations

from pathlib import Path

import torch

from .adapters import inject
from .config import Config, load_config
from .data.dataset import build_dataset
from .encoders.cformer import CFormer
from .encoders.speech import SpeechEncoder, build_speech_encoder
from .encoders.vision import build_vision_encoder
from .errors import InputError
from .export import load_weights, read_adapter_config
from .llm import base_fingerprint, load_llm
from .model import DistillSettings, MultimodalLM
from .projectors import SpeechProjector, build_projector, embedding_rms


def build_model(cfg: Config) -> MultimodalLM:
    """Build the configured model with untrained adapters and projector.

    Parts without a pretrained source (random LLM, encoder without ``weights``,
    projector, adapters) are seeded from ``train.seed``; ``model.random_parts``
    lists their groups so a run can save them to ``base.safetensors``.
    """
    loaded = load_llm(cfg.model.llm, seed=cfg.train.seed)
    llm = loaded.model
    fingerprint = base_fingerprint(llm)
    random_parts = {"projector", "adapters"} | ({"llm"} if loaded.pretrained_source is None else set())
    encoders, projectors = {}, {}
    if cfg.model.vision is not None:
        torch.manual_seed(cfg.train.seed + 1)
        encoder = build_vision_encoder(cfg.model.vision)
        encoders["image"] = encoder
        width = llm.get_input_embeddings().embedding_dim
        rms = embedding_rms(llm.get_input_embeddings())
        projectors["image"] = build_projector(cfg.model.projector, encoder.width, width, rms)
        if cfg.model.vision.weights is None:
            random_parts.add("vision")
    if cfg.model.speech is not None:
        torch.manual_seed(cfg.train.seed + 3)
        encoders["speech"], projectors["speech"] = _speech_path(cfg, llm)
        if cfg.model.speech.encoder.source == "random":
            random_parts.add("speech")
    torch.manual_seed(cfg.train.seed + 2)
    inject(llm, cfg.adapters)
    model = MultimodalLM(llm, loaded.tokenizer, encoders, projectors)
    model.distill = DistillSettings(cfg.loss.temperature, cfg.loss.kd, cfg.loss.input_kl, cfg.loss.quantity)
    model.image_alignment = cfg.train.align_loss
    model.readout_negatives = cfg.train.readout_negatives
    model.base_fingerprint = fingerprint
    model.random_parts = sorted(random_parts)
    return model


def _speech_path(cfg: Config, llm) -> tuple[SpeechEncoder, SpeechProjector]:
    """The speech encoder and its CFormer + projector into the LLM's embedding space."""
    encoder = build_speech_encoder(cfg.model.speech.encoder)
    cformer = CFormer(cfg.model.speech.cformer.model_copy(update={"width": encoder.width}))
    embeddings = llm.get_input_embeddings()
    projector = build_projector(cfg.model.projector, encoder.width, embeddings.embedding_dim, embedding_rms(embeddings))
    return encoder, SpeechProjector(cformer, projector)


def model_dataset(cfg: Config, model: MultimodalLM, path: str, for_generation: bool = False):
    """Read and tokenize ``path`` for ``model`` (its tokenizer, image token count and preprocessing).

    Returns:
        ``(ConversationDataset, skipped Counter)`` as :func:`mmadapt.data.dataset.build_dataset`.
    """
    encoder = model.encoders["image"] if "image" in model.encoders else None
    speech = model.encoders["speech"] if "speech" in model.encoders else None
    return build_dataset(
        path, model.tokenizer, cfg.data, encoder.num_tokens if encoder else 0,
        encoder.preprocess if encoder else None, for_generation=for_generation,
        preprocess_audio=speech.features if speech else None,
    )


def eval_datasets(cfg: Config, model: MultimodalLM):
    """``((loss_set, generation_set), skipped)`` for ``cfg.data.eval``; BLSP-KD reads its
    metrics off the loss pass, so its generation set is None."""
    loss_set, skipped = model_dataset(cfg, model, cfg.data.eval)
    if cfg.loss.type == "blsp_kd":
        return (loss_set, None), skipped
    generation_set, _ = model_dataset(cfg, model, cfg.data.eval, for_generation=True)
    return (loss_set, generation_set), skipped


def random_tensor_names(model: MultimodalLM) -> set[str]:
    """State-dict names of the randomly initialised parts (saved as ``base.safetensors``)."""
    groups = model.parameter_groups()
    names = {name for group in model.random_parts for name in groups[group]}
    prefixes = {"llm": "llm.", "vision": "encoders.image.", "speech": "encoders.speech.", "projector": "projectors."}
    for name, _ in model.named_buffers():
        if any(name.startswith(prefixes[g]) for g in model.random_parts if g in prefixes):
            names.add(name)
    return names


def load_trained(output_dir: str | Path) -> MultimodalLM:
    """Rebuild a finished run's model: its config, base weights and trained tensors, in eval mode.

    Raises:
        InputError: the folder is not a finished run, or its base weights differ from the preset's.
    """
    output_dir = Path(output_dir)
    meta = read_adapter_config(output_dir)
    model = build_model(load_config(output_dir / "config.yaml"))
    if meta["base_fingerprint"] != model.base_fingerprint:
        raise InputError(
            f"{output_dir} was trained on base weights {meta['base_fingerprint']}, but preset "
            f"{meta['preset']} now loads {model.base_fingerprint}; the base model changed"
        )
    if (output_dir / "base.safetensors").exists():
        load_weights(model, output_dir / "base.safetensors")
    load_weights(model, output_dir / "adapter" / "adapter.safetensors")
    return model.eval()
