"""How an exception is told to a user in one line (CLI errors, HTTP details, job messages)."""

from __future__ import annotations


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of ``e``'s message (its ``message`` attribute when it has one, as
    pymilvus's errors do), cut to ``limit`` characters; the exception's type name when the message
    is empty (``str(OSError())`` is ``""``), so a caller never indexes an empty list."""
    text = str(getattr(e, "message", None) or e).strip()
    line = text.splitlines()[0].strip() if text else type(e).__name__
    return line[:limit] if limit is not None else line
