"""The ``data.*`` section of a recipe."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class DataConfig(BaseModel):
    """Where conversations come from and how bad or long ones are handled."""

    model_config = ConfigDict(extra="forbid")

    train: str = Field(description="JSONL file of training conversations; record file paths are relative to it")
    eval: str | None = Field(default=None, description="JSONL file of evaluation conversations, or null for none")
    on_bad_record: Literal["error", "skip"] = Field(
        default="error", description="error: stop at the first bad record; skip: count, log and drop it"
    )
    max_length: int = Field(
        default=512,
        gt=0,
        description="longest sample in tokens, modality slots included; longer ones are bad records, never truncated",
    )
    max_audio_seconds: float = Field(default=30.0, gt=0, description="longest audio clip in seconds")
    system_prompt: str | None = Field(
        default=None,
        description="system message prepended to conversations that have none; null keeps the chat template's default",
    )
    eval_samples: int | None = Field(default=None, gt=0, description="use at most this many eval records; null: all")
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes (0: load in the main process)")
    audio_cache_mb: int = Field(
        default=1024, ge=0, description="keep up to this many MB of log-mel features in memory, per loader "
        "process, first come first kept (decoding compressed audio again every epoch is slow); 0: no cache",
    )
    group_by_length: bool = Field(
        default=True, description="batch samples of similar length together (less padding), in a seeded order"
    )
    group_alignment_by_length: bool = Field(
        default=False, description="with group_by_length, group the alignment stage's batches too: less encoder "
        "padding for speech; for images (no padding) plain shuffles train the encoder better",
    )
    speech_prompt: str = Field(
        default="Continue the following text in a coherent style: {transcript}",
        description="BLSP-KD user turn: {transcript} becomes the transcript for the teacher and the speech for "
        "the student; the transcript is tokenized on its own (after a space when one precedes it)",
    )

    @field_validator("speech_prompt")
    @classmethod
    def _one_transcript_slot(cls, prompt: str) -> str:
        if prompt.count("{transcript}") != 1:
            raise ValueError("must contain {transcript} exactly once")
        return prompt

