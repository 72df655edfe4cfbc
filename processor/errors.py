"""Why a file was refused, in words a user can act on."""

from __future__ import annotations


class Rejected(Exception):
    """The file cannot be ingested as a whole; the message is stored in the ledger."""

    def __init__(self, reason: str, *, format_name: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.format_name = format_name


def at_line(line: int, message: str) -> str:
    return f"line {line}: {message}"
