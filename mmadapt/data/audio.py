"""Read an audio file into the waveform the speech encoder expects: float32, mono, 16 kHz.

soundfile (libsndfile) decodes wav, flac, ogg/vorbis and the other formats it knows, at
any sample rate and channel count, integer or float samples (integers are scaled to
[-1, 1]). Channels are averaged to mono and torchaudio resamples to 16 kHz.

A file that cannot be used raises :class:`AudioError` naming the path, with a short
``reason`` the data layer counts when it skips bad records. Silence is valid input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.functional

from mmadapt.errors import InputError

SAMPLE_RATE = 16000  # what Whisper's feature extractor expects


class AudioError(InputError):
    """An audio file is missing, unreadable, empty, non-finite or too long.

    Attributes:
        path: the file.
        reason: ``missing_audio``, ``unreadable_audio``, ``empty_audio``, ``nonfinite_audio``
            or ``audio_too_long``.
    """

    def __init__(self, path: str | Path, reason: str, problem: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"audio {path}: {problem}")


def load_audio(path: str | Path, max_seconds: float | None = None) -> torch.Tensor:
    """Decode an audio file to a mono 16 kHz waveform.

    Args:
        path: the audio file.
        max_seconds: longest accepted duration (``data.max_audio_seconds``); None: no limit.

    Returns:
        ``[samples]`` float32 waveform at :data:`SAMPLE_RATE`.

    Raises:
        AudioError: the file is missing, not decodable, holds no samples, holds NaN or
            infinite samples, or lasts longer than ``max_seconds``.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "missing_audio", "no such file")
    try:
        # The header gives the duration, so an over-long file is refused before it is decoded.
        info = soundfile.info(str(path))
        _check_duration(path, info.frames / info.samplerate, max_seconds)
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # (n, channels)
    except soundfile.SoundFileError as error:
        raise AudioError(path, "unreadable_audio", f"not a readable audio file ({error})") from None
    if samples.shape[0] == 0:
        raise AudioError(path, "empty_audio", "holds no samples")
    _check_duration(path, samples.shape[0] / rate, max_seconds)  # headers can understate the length
    if not np.isfinite(samples).all():
        raise AudioError(path, "nonfinite_audio", "holds NaN or infinite samples")
    mono = torch.from_numpy(samples).mean(dim=1)  # (n,)
    if rate == SAMPLE_RATE:
        return mono
    return torchaudio.functional.resample(mono, rate, SAMPLE_RATE)


def _check_duration(path: Path, seconds: float, max_seconds: float | None) -> None:
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(
            path, "audio_too_long", f"lasts {seconds:.2f} s, longer than data.max_audio_seconds={max_seconds:g}"
        )
