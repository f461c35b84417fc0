"""Modality encoders: pixels and waveforms to token embeddings."""
