"""The dataset keeps decoded audio features in memory up to a byte budget."""

import datasets
import numpy as np
import soundfile
import torch

from mmadapt.data.dataset import ConversationDataset


def _dataset(tmp_path, clips: int, cache_mb: int) -> ConversationDataset:
    paths = []
    for i in range(clips):
        path = tmp_path / f"clip{i}.wav"
        soundfile.write(path, np.random.default_rng(i).uniform(-0.5, 0.5, 16000).astype(np.float32), 16000)
        paths.append(str(path))
    table = datasets.Dataset.from_list(
        [{"id": f"r{i}", "input_ids": [1, 2], "images": [], "audios": [p], "labels": [1, 2]} for i, p in enumerate(paths)]
    )
    calls = []

    def features(waveform: torch.Tensor) -> torch.Tensor:  # 1 MiB per clip: [16, 16384] float32
        calls.append(1)
        return waveform[:16384].repeat(16, 2)[:, :16384].contiguous()

    dataset = ConversationDataset(table, None, features, audio_cache_mb=cache_mb)
    dataset.calls = calls
    return dataset


def test_cached_features_equal_fresh_ones_and_skip_the_decode(tmp_path):
    dataset = _dataset(tmp_path, 3, cache_mb=10)
    first = [dataset[i]["audios"][0] for i in range(3)]
    again = [dataset[i]["audios"][0] for i in range(3)]
    assert len(dataset.calls) == 3
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_cache_keeps_the_first_clips_within_the_budget(tmp_path):
    dataset = _dataset(tmp_path, 4, cache_mb=2)  # room for two 1 MiB clips
    for _ in range(2):
        for i in range(4):
            dataset[i]
    assert len(dataset.calls) == 4 + 2  # clips 2 and 3 are decoded every time


def test_zero_budget_caches_nothing(tmp_path):
    dataset = _dataset(tmp_path, 2, cache_mb=0)
    dataset[0], dataset[0]
    assert len(dataset.calls) == 2
