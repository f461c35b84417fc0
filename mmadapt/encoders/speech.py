"""Speech encoder: a Whisper encoder that turns a waveform into 50 Hz frames at its real length.

Data flow::

    waveform [samples] @ 16 kHz
      -> features():  log-mel [n_mels, frames] @ 100 Hz (WhisperFeatureExtractor, unpadded)
      -> forward():   split into windows of <= chunk_seconds, batch every window of every item,
                      conv1 -> gelu -> conv2 (stride 2) -> gelu -> + embed_positions[:T']
                      -> encoder layers (padding masked) -> layer_norm
                      -> windows concatenated back per item: hidden [B, T', D] @ 50 Hz, frame_mask [B, T']

transformers' ``WhisperEncoder.forward`` accepts only inputs padded to its full window
(3000 mel frames, 30 s) and attends over that padding. Here its own submodules run on each
window's real frames, with a slice of the position table, so a 2 s clip costs 2 s of compute
and its frames do not depend on what it is batched with.

Limit that remains: windows are encoded independently, so no frame attends past its own
window (``chunk_seconds``, at most the encoder's 30 s window); the log-mel features, and their
dynamic-range floor (the clip's maximum minus 8), are computed over the whole clip. Cost grows
linearly with the number of windows; ``data.max_audio_seconds`` bounds the length.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mmadapt.compat import set_activation_checkpointing
from mmadapt.errors import InputError

# Small random encoder used when the preset gives no `whisper` overrides.
SMALL_WHISPER: dict[str, Any] = dict(
    d_model=256, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024,
    num_mel_bins=80, max_source_positions=1500,
)
FEATURE_RATE = 100  # log-mel frames per second: hop of 160 samples at 16 kHz


class SpeechConfig(BaseModel):
    """Which Whisper encoder to build, from which weights, and how long a window it encodes at once."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["random", "pretrained"] = Field(
        "random", description="random: a new encoder from `whisper`; pretrained: loaded from `path`"
    )
    path: str | None = Field(
        None, description="local folder written by save_pretrained of a Whisper model (source: pretrained)"
    )
    whisper: dict[str, Any] = Field(
        default_factory=dict,
        description=f"WhisperConfig overrides for source: random, over the small defaults {SMALL_WHISPER}",
    )
    chunk_seconds: float | None = Field(
        None, gt=0, description="longer audio is encoded in independent windows of this length "
        "(a multiple of 0.02 s); null: the encoder's whole window (30 s for Whisper)",
    )

    @model_validator(mode="after")
    def _source_matches_fields(self) -> "SpeechConfig":
        if self.source == "pretrained" and self.path is None:
            raise ValueError("speech.path: source pretrained needs the folder to load")
        if self.source == "random" and self.path is not None:
            raise ValueError("speech.path: given, but source is random (set source: pretrained to load it)")
        if self.source == "pretrained" and self.whisper:
            raise ValueError("speech.whisper: applies to source random only; a pretrained folder has its config")
        return self


class SpeechEncoder(nn.Module):
    """A Whisper encoder run at each clip's real length, windowed past ``chunk_frames``.

    Args:
        encoder: the Whisper encoder whose submodules run (weights are shared, not copied).
        chunk_frames: mel frames per window; even, at most the encoder's window.
    """

    def __init__(self, encoder: WhisperEncoder, chunk_frames: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.chunk_frames = chunk_frames
        # Whisper's defaults: 16 kHz, 25 ms window, 10 ms hop; only the mel count follows the encoder.
        self.extractor = WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins)

    @property
    def width(self) -> int:
        """Width of each output frame (``d_model``)."""
        return self.encoder.config.d_model

    def features(self, waveform: torch.Tensor) -> torch.Tensor:
        """Whisper log-mel features of a whole clip, unpadded.

        Args:
            waveform: ``[samples]`` float mono audio at 16 kHz.

        Returns:
            ``[n_mels, samples // 160]`` float32 features at 100 Hz. A clip shorter than the
            400-sample (25 ms) STFT window is first padded with silence to that length.
        """
        # The STFT reflects the clip at both ends, which needs more samples than half a window.
        window = self.extractor.n_fft
        if waveform.numel() < window:
            waveform = F.pad(waveform, (0, window - waveform.numel()))
        out = self.extractor(
            waveform.float().cpu().numpy(), sampling_rate=self.extractor.sampling_rate,
            padding="longest", truncation=False, return_tensors="pt",
        )
        return out["input_features"][0]

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode clips at their real lengths.

        Args:
            features: one ``[n_mels, frames]`` tensor per clip, as :meth:`features` returns.

        Returns:
            ``hidden [B, T', width]`` at 50 Hz (``T'`` = the longest clip's ``ceil(frames / 2)``)
            and ``frame_mask Bool[B, T']``, True on each clip's real frames.
        """
        windows, counts = [], []
        for item in features:
            if item.dim() != 2 or item.shape[0] != self.encoder.config.num_mel_bins or item.shape[1] == 0:
                raise ValueError(
                    f"speech features must be [{self.encoder.config.num_mel_bins}, frames>0], got {tuple(item.shape)}"
                )
            split = torch.split(item, self.chunk_frames, dim=1)
            windows.extend(split)
            counts.append(len(split))
        hidden, lengths = self._encode_windows(windows)  # (W, T', D), (W,)
        per_window = [h[:n] for h, n in zip(hidden, lengths.tolist())]
        items, start = [], 0
        for count in counts:
            items.append(torch.cat(per_window[start : start + count]))
            start += count
        item_lengths = torch.tensor([len(item) for item in items], device=hidden.device)
        out = pad_sequence(items, batch_first=True)  # (B, T', D)
        frame_mask = torch.arange(out.shape[1], device=out.device) < item_lengths[:, None]
        return out, frame_mask

    def _encode_windows(self, windows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.encoder
        weight = encoder.conv1.weight
        frames = torch.tensor([w.shape[1] for w in windows], device=weight.device)
        x = pad_sequence([w.T for w in windows], batch_first=True).transpose(1, 2)  # (W, n_mels, F)
        x = x.to(weight.device, weight.dtype)
        real = torch.arange(x.shape[2], device=x.device) < frames[:, None]  # (W, F)
        # conv2 reads one frame past a window's end: it must see zeros, as it would alone.
        x = F.gelu(encoder.conv1(x)) * real[:, None]
        x = F.gelu(encoder.conv2(x)).transpose(1, 2)  # (W, T', D)
        lengths = (frames + 1) // 2  # conv2 has stride 2 and padding 1
        x = x + encoder.embed_positions.weight[: x.shape[1]]
        x = F.dropout(x, p=encoder.dropout, training=self.training)
        valid = torch.arange(x.shape[1], device=x.device) < lengths[:, None]  # (W, T')
        mask = create_bidirectional_mask(encoder.config, x, valid)
        for layer in encoder.layers:
            if self.training and encoder.layerdrop > 0 and torch.rand([]) < encoder.layerdrop:
                continue
            x = layer(x, mask)
        return encoder.layer_norm(x), lengths

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing of the encoder layers on or off."""
        set_activation_checkpointing(self.encoder, enable)


def build_speech_encoder(cfg: SpeechConfig) -> SpeechEncoder:
    """Build the configured Whisper encoder: random from ``cfg.whisper`` or loaded from ``cfg.path``.

    Args:
        cfg: the ``speech`` section of a model preset.

    Returns:
        The encoder, in training mode, on the CPU, in float32.

    Raises:
        InputError: ``cfg.path`` is not a loadable Whisper folder, ``cfg.whisper`` has an unknown
            or invalid key, or ``cfg.chunk_seconds`` does not fit the encoder's window.
    """
    encoder = _load_pretrained(cfg.path) if cfg.source == "pretrained" else _build_random(cfg.whisper)
    encoder.train()
    return SpeechEncoder(encoder, _chunk_frames(cfg.chunk_seconds, encoder))


def _build_random(overrides: dict[str, Any]) -> WhisperEncoder:
    known = {field.name for field in dataclasses.fields(WhisperConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InputError(f"speech.whisper: WhisperConfig has no key(s) {unknown}")
    try:
        config = WhisperConfig(**{**SMALL_WHISPER, **overrides})
        return WhisperEncoder(config)
    except (TypeError, ValueError) as error:
        raise InputError(f"speech.whisper: cannot build a Whisper encoder from {overrides}: {error}") from None


def _load_pretrained(path: str) -> WhisperEncoder:
    folder = Path(path)
    # Checked here because from_pretrained would take a missing folder for a hub name.
    if not (folder / "config.json").is_file():
        raise InputError(f"speech.path: {folder} is not a save_pretrained folder (no config.json)")
    try:
        model = WhisperModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"speech.path: cannot load a Whisper model from {folder}: {error}") from None
    return model.encoder  # the decoder is dropped with `model`


def _chunk_frames(chunk_seconds: float | None, encoder: WhisperEncoder) -> int:
    window = encoder.config.max_source_positions * encoder.conv1.stride[0] * encoder.conv2.stride[0]
    if chunk_seconds is None:
        return window
    frames = round(chunk_seconds * FEATURE_RATE)
    if abs(frames - chunk_seconds * FEATURE_RATE) > 1e-6 or frames % 2 or not 0 < frames <= window:
        raise InputError(
            f"speech.chunk_seconds: {chunk_seconds} must be a multiple of 0.02 s and at most the "
            f"encoder's window of {window / FEATURE_RATE:g} s"
        )
    return frames
