import pytest
import torch
from pydantic import ValidationError
from transformers import WhisperConfig, WhisperModel

from mmadapt.encoders.speech import SpeechConfig, build_speech_encoder
from mmadapt.errors import InputError

# A 1-second window: 50 positions after conv2's stride 2 = 100 mel frames.
TINY = dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, max_source_positions=50)
WINDOW = 100


def tiny_encoder(**overrides):
    torch.manual_seed(0)
    return build_speech_encoder(SpeechConfig(**{"whisper": TINY, **overrides})).eval()


def noise(samples: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(samples, generator=torch.Generator().manual_seed(seed)) * 0.1


def mel(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(80, frames, generator=torch.Generator().manual_seed(seed))


def test_features_of_a_full_window_equal_the_extractor():
    enc = tiny_encoder()
    wave = noise(enc.extractor.n_samples)  # exactly 30 s: the extractor pads nothing

    expected = enc.extractor(wave.numpy(), sampling_rate=16000, return_tensors="pt")["input_features"][0]

    assert torch.equal(enc.features(wave), expected)


def test_features_keep_the_real_length_and_match_the_padded_extractor():
    enc = tiny_encoder()
    wave = noise(40_000)  # 2.5 s

    features = enc.features(wave)

    padded = enc.extractor(wave.numpy(), sampling_rate=16000, return_tensors="pt")["input_features"][0]
    assert features.shape == (80, 250) and padded.shape == (80, 3000)
    # the last frame's STFT window reaches past the end: reflected audio here, zero padding there
    assert torch.equal(features[:, :-1], padded[:, :249])


def test_features_are_not_cut_at_thirty_seconds():
    enc = tiny_encoder()

    assert enc.features(noise(31 * 16_000)).shape == (80, 3100)


def test_features_follow_the_encoder_mel_count_and_accept_silence_and_tiny_clips():
    enc = tiny_encoder(whisper={**TINY, "num_mel_bins": 128})

    silence = enc.features(torch.zeros(16_000))
    tiny = enc.features(noise(50))

    assert silence.shape == (128, 100) and torch.isfinite(silence).all()
    assert tiny.shape == (128, 2)  # padded to one 25 ms STFT window
    assert enc([silence, tiny])[0].shape == (2, 50, 32)


def test_full_window_equals_the_stock_whisper_encoder():
    enc = tiny_encoder()
    features = enc.features(noise(16_000))
    assert features.shape == (80, WINDOW)

    hidden, frame_mask = enc([features])

    stock = enc.encoder(features[None]).last_hidden_state
    assert hidden.shape == (1, 50, enc.width) and frame_mask.all()
    assert torch.allclose(hidden, stock, atol=1e-6)


def test_padding_in_a_batch_does_not_change_real_frames():
    enc = tiny_encoder()
    items = [mel(WINDOW, 1), mel(37, 2), mel(64, 3)]

    hidden, frame_mask = enc(items)

    assert hidden.shape == (3, 50, 32)
    assert frame_mask.sum(dim=1).tolist() == [50, 19, 32]  # ceil(frames / 2): 50 Hz
    for row, item in enumerate(items):
        alone, alone_mask = enc([item])
        n = alone.shape[1]
        assert alone_mask.all() and not frame_mask[row, n:].any()
        assert torch.allclose(hidden[row, :n], alone[0], atol=1e-5)


def test_long_audio_is_encoded_in_independent_windows():
    enc = tiny_encoder()
    features = mel(250)  # 2.5 windows

    hidden, frame_mask = enc([features, mel(30, 1)])

    windows = [enc([features[:, start : start + WINDOW]])[0][0] for start in (0, 100, 200)]
    expected = torch.cat(windows)
    assert expected.shape == (125, 32) and frame_mask[0].all() and frame_mask[1].sum() == 15
    assert torch.allclose(hidden[0], expected, atol=1e-5)


def test_chunk_seconds_sets_the_window():
    enc = tiny_encoder(chunk_seconds=0.4)
    features = mel(90)

    hidden, _ = enc([features])

    windows = [enc([features[:, start : start + 40]])[0][0] for start in (0, 40, 80)]
    assert enc.chunk_frames == 40 and torch.allclose(hidden[0], torch.cat(windows), atol=1e-5)


def test_default_config_is_the_small_encoder_with_a_30_second_window():
    enc = build_speech_encoder(SpeechConfig())

    assert enc.width == 256 and enc.chunk_frames == 3000 and len(enc.encoder.layers) == 4


@pytest.mark.parametrize("seconds", [1.02, 0.25])
def test_chunk_seconds_must_fit_the_window_in_whole_output_frames(seconds):
    with pytest.raises(InputError, match="speech.chunk_seconds"):
        tiny_encoder(chunk_seconds=seconds)


def test_gradients_reach_the_encoder_and_checkpointing_keeps_them():
    enc = tiny_encoder().train()
    items = [mel(80), mel(30, 1)]

    def run():
        enc.zero_grad()
        hidden, mask = enc(items)
        hidden[mask].square().sum().backward()
        return hidden.detach(), enc.encoder.conv1.weight.grad.clone()

    plain_out, plain_grad = run()
    enc.set_grad_checkpointing(True)
    ckpt_out, ckpt_grad = run()

    assert plain_grad.abs().sum() > 0 and enc.encoder.layers[0].gradient_checkpointing
    assert torch.allclose(plain_out, ckpt_out) and torch.allclose(plain_grad, ckpt_grad, atol=1e-6)


def test_pretrained_folder_loads_the_same_encoder(tmp_path):
    torch.manual_seed(0)
    sizes = dict(TINY, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=100,
                 max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    ref = WhisperModel(WhisperConfig(**sizes)).eval()
    ref.save_pretrained(tmp_path)
    features = mel(WINDOW)

    enc = build_speech_encoder(SpeechConfig(source="pretrained", path=str(tmp_path))).eval()

    expected = ref.encoder(features[None]).last_hidden_state
    assert torch.equal(enc.encoder.conv1.weight, ref.encoder.conv1.weight)
    assert torch.allclose(enc([features])[0], expected, atol=1e-6)


def test_missing_pretrained_folder_is_an_input_error(tmp_path):
    missing = tmp_path / "no-whisper-here"

    with pytest.raises(InputError, match=str(missing)):
        build_speech_encoder(SpeechConfig(source="pretrained", path=str(missing)))


def test_unknown_whisper_key_is_an_input_error():
    with pytest.raises(InputError, match="d_modle"):
        build_speech_encoder(SpeechConfig(whisper={"d_modle": 32}))


@pytest.mark.parametrize(
    "fields, key",
    [(dict(source="pretrained"), "speech.path"), (dict(path="x"), "speech.path"),
     (dict(source="pretrained", path="x", whisper={"d_model": 8}), "speech.whisper"), (dict(sorce="random"), "sorce")],
)
def test_config_rejects_inconsistent_fields(fields, key):
    with pytest.raises(ValidationError, match=key):
        SpeechConfig(**fields)


def test_features_of_the_wrong_shape_are_refused():
    enc = tiny_encoder()

    with pytest.raises(ValueError, match=r"\[80, frames>0\]"):
        enc([torch.zeros(64, 10)])
