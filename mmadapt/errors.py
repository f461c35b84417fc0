"""Errors that mean "the user's input is wrong": the CLI prints one line and exits 2."""


class InputError(ValueError):
    """Bad config, data record or file; the message names the key or record."""


class BadRecord(InputError):
    """A data record is unusable; under ``data.on_bad_record=skip`` it is counted and skipped."""

    def __init__(self, source: str, line: int, record_id: str | None, problem: str) -> None:
        self.source, self.line, self.record_id, self.problem = source, line, record_id, problem
        super().__init__(f"{source}:{line} (id={record_id!r}): {problem}")
