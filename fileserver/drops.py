"""Where uploads go: confinement to the user's folder, and publish-on-complete.

The processor ingests every visible file, so an upload must never be visible under
its final name before it is complete.  Uploads are written to a hidden partial name
beside the final one (``.NAME.part-XXXX``; the processor skips dot-names) and renamed
into place only once the server has proof the transfer completed; the modification
time is set at that moment, and it is the delivery's version.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path, PurePosixPath


class Refused(PermissionError):
    """A path or operation outside what a drop-box user may do."""


def inside(home: Path, requested: str | bytes, cwd: str = "/") -> Path:
    """The real path for a client's path, which must stay within ``home``.

    Client paths are POSIX paths relative to the user's root (``/`` is ``home``). ``..``
    cannot climb above it, NUL bytes and hidden names are refused, and no component
    inside ``home`` may be a symlink (a planted link must not lead out).
    """
    text = requested.decode("utf-8", errors="strict") if isinstance(requested, bytes) else requested
    if "\x00" in text:
        raise Refused("NUL byte in path")
    joined = PurePosixPath(cwd) / text
    parts: list[str] = []
    for part in joined.parts:
        if part in ("/", "", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        if part.startswith("."):
            raise Refused(f"hidden names are reserved: {part!r}")
        if len(part.encode()) > 255:
            raise Refused("name too long")
        parts.append(part)
    path = home.joinpath(*parts)
    probe = home
    for part in parts:
        probe = probe / part
        if probe.is_symlink():
            raise Refused(f"symlink in path: {'/'.join(parts)}")
    return path


def virtual(home: Path, real: Path) -> str:
    """The client's view of a real path under ``home``."""
    relative = real.relative_to(home)
    return "/" + relative.as_posix() if relative.parts else "/"


def partial_for(final: Path) -> Path:
    """A fresh hidden name beside ``final`` for the upload in progress."""
    return final.with_name(f".{final.name}.part-{secrets.token_hex(4)}")


def publish(partial: Path, final: Path) -> None:
    """Make a completed upload visible: stamp its delivery time, then rename it into place."""
    os.utime(partial)
    os.replace(partial, final)


def discard(partial: Path) -> None:
    """Remove an upload that did not complete; it must never be ingested."""
    partial.unlink(missing_ok=True)


def sweep_partials(root: Path) -> int:
    """Delete partial uploads left by a crash; call only while no server is running."""
    removed = 0
    for partial in root.rglob(".*.part-*"):
        if partial.is_file() and not partial.is_symlink():
            partial.unlink(missing_ok=True)
            removed += 1
    return removed
