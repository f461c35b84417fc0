"""Using a trained run: chat (``chat.py``), batch inference (``batch.py``) and what they share (``prompts.py``)."""

from .chat import ChatSession

__all__ = ["ChatSession"]
