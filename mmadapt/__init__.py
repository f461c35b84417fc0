"""mmadapt: adapt pretrained language models to images and speech with modality-masked adapters."""

from .build import build_model, load_trained
from .config import load_config
from .modality import IMAGE, SPEECH, TEXT, disable_adapters, modality_ids
from .model import MultimodalLM

__all__ = [
    "IMAGE",
    "SPEECH",
    "TEXT",
    "MultimodalLM",
    "build_model",
    "disable_adapters",
    "load_config",
    "load_trained",
    "modality_ids",
]
