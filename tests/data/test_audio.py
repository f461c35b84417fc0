import numpy as np
import pytest
import soundfile
import torch

from mmadapt.data.audio import SAMPLE_RATE, AudioError, load_audio
from mmadapt.errors import InputError


def sine(rate: int, seconds: float = 1.0, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.mark.parametrize("suffix, subtype", [("wav", "PCM_16"), ("flac", "PCM_16"), ("wav", "FLOAT")])
def test_lossless_round_trip(tmp_path, suffix, subtype):
    wave = sine(SAMPLE_RATE)
    path = tmp_path / f"a.{suffix}"
    soundfile.write(path, wave, SAMPLE_RATE, subtype=subtype)

    loaded = load_audio(path, max_seconds=30)

    assert loaded.dtype == torch.float32 and loaded.shape == (SAMPLE_RATE,)
    assert torch.allclose(loaded, torch.from_numpy(wave), atol=1 / 32768 if subtype == "PCM_16" else 0)


def test_ogg_vorbis_round_trip_keeps_length_and_waveform(tmp_path):
    wave = sine(SAMPLE_RATE)
    path = tmp_path / "a.ogg"
    soundfile.write(path, wave, SAMPLE_RATE, format="OGG", subtype="VORBIS")

    loaded = load_audio(path, max_seconds=None)

    assert loaded.shape == (SAMPLE_RATE,)
    assert np.corrcoef(loaded.numpy(), wave)[0, 1] > 0.99  # lossy codec: same wave, not same samples


def test_int16_samples_are_scaled_to_unit_range(tmp_path):
    path = tmp_path / "a.wav"
    soundfile.write(path, np.full(1600, 16384, dtype=np.int16), SAMPLE_RATE, subtype="PCM_16")

    assert torch.equal(load_audio(path, None), torch.full((1600,), 0.5))


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = sine(SAMPLE_RATE, hz=300), sine(SAMPLE_RATE, hz=500)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")

    loaded = load_audio(path, None)

    assert torch.allclose(loaded, torch.from_numpy((left + right) / 2), atol=1e-7)


@pytest.mark.parametrize("rate", [8000, 44100])
def test_other_rates_are_resampled_to_16k(tmp_path, rate):
    path = tmp_path / "a.wav"
    soundfile.write(path, sine(rate), rate, subtype="FLOAT")

    loaded = load_audio(path, None)

    assert loaded.shape == (SAMPLE_RATE,)
    # the same 440 Hz tone, sampled at 16 kHz (edges skipped: the filter sees zeros past them)
    inner = slice(200, -200)
    assert torch.allclose(loaded[inner], torch.from_numpy(sine(SAMPLE_RATE))[inner], atol=1e-2)


def test_silence_is_valid(tmp_path):
    path = tmp_path / "silence.flac"
    soundfile.write(path, np.zeros(8000, dtype=np.float32), SAMPLE_RATE)

    assert torch.equal(load_audio(path, 1.0), torch.zeros(8000))


def test_duration_limit_is_inclusive(tmp_path):
    path = tmp_path / "one_second.wav"
    soundfile.write(path, sine(SAMPLE_RATE), SAMPLE_RATE)

    assert load_audio(path, max_seconds=1.0).shape == (SAMPLE_RATE,)


def write_bad(tmp_path, case):
    path = tmp_path / f"{case}.wav"
    if case == "missing_audio":
        return path
    if case == "unreadable_audio":
        path.write_bytes(b"this is not audio" * 20)
    elif case == "empty_audio":
        soundfile.write(path, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    elif case == "nonfinite_audio":
        wave = sine(SAMPLE_RATE)
        wave[10], wave[20] = np.nan, np.inf
        soundfile.write(path, wave, SAMPLE_RATE, subtype="FLOAT")
    elif case == "audio_too_long":
        soundfile.write(path, sine(8000, seconds=2.5), 8000)
    return path


@pytest.mark.parametrize(
    "case", ["missing_audio", "unreadable_audio", "empty_audio", "nonfinite_audio", "audio_too_long"]
)
def test_bad_audio_raises_naming_the_file(tmp_path, case):
    path = write_bad(tmp_path, case)

    with pytest.raises(AudioError) as caught:
        load_audio(path, max_seconds=2.0)

    assert isinstance(caught.value, InputError)
    assert caught.value.reason == case and caught.value.path == str(path)
    assert str(path) in str(caught.value)


def test_infinite_only_sample_is_refused(tmp_path):
    path = tmp_path / "inf.wav"
    wave = np.zeros(1600, dtype=np.float64)
    wave[5] = -np.inf
    soundfile.write(path, wave, SAMPLE_RATE, subtype="DOUBLE")

    with pytest.raises(AudioError, match="NaN or infinite"):
        load_audio(path, None)


def test_truncated_flac_is_unreadable(tmp_path):
    path = tmp_path / "cut.flac"
    soundfile.write(path, np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1, SAMPLE_RATE)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(AudioError) as caught:
        load_audio(path, None)

    assert caught.value.reason == "unreadable_audio"


def test_directory_is_missing_audio(tmp_path):
    with pytest.raises(AudioError) as caught:
        load_audio(tmp_path, None)

    assert caught.value.reason == "missing_audio"
