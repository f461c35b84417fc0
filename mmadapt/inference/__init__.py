"""Using a trained run: chat about images and speech (``chat.py``)."""

from .chat import ChatSession

__all__ = ["ChatSession"]
