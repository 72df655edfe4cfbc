"""Where uploads go: confinement to the user's folder, and publish-on-complete.

The processor ingests every visible file, so an upload must never be visible under
its final name before it is complete.  Uploads are written to a hidden partial name
beside the final one (``.NAME.part-XXXX``; the processor skips dot-names) and renamed
into place only once the server has proof the transfer completed; the modification
time is set at that moment, and it is the delivery's version.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath

log = logging.getLogger("meterdrop.drops")

# Errors that mean "the disk (or the user's quota) is full": answered 452 over FTPS and
# FX_NO_SPACE_ON_FILESYSTEM/FX_FAILURE "No space left on device" over SFTP.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_PATH_MAX = 4096  # Linux's limit for a whole path, in bytes


class Refused(PermissionError):
    """A path or operation outside what a drop-box user may do."""


def inside(home: Path, requested: str | bytes, cwd: str = "/") -> Path:
    """The real path for a client's path, which must stay within ``home``.

    Client paths are POSIX paths relative to the user's root (``/`` is ``home``). ``..``
    cannot climb above it, NUL bytes, control characters and hidden names are refused, and no component
    inside ``home`` may be a symlink (a planted link must not lead out).  Nor may the
    path name a regular file with more than one hard link: the servers never create
    one (uploads are renamed into place, links are refused), so such a file was planted
    from outside and may share its content with a file outside the folder, such as
    another user's delivery or a secret; reading it would leak that file.
    """
    text = requested.decode("utf-8", errors="strict") if isinstance(requested, bytes) else requested
    if "\x00" in text:
        raise Refused("NUL byte in path")
    if any(ch < " " or ch == "\x7f" for ch in text):
        # A line break in a name would let an uploader write lines of their own into the log.
        raise Refused("control character in path")
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
    if len(os.fsencode(path)) >= _PATH_MAX:  # else lstat() raises ENAMETOOLONG below
        raise Refused("path too long")
    probe = home
    for part in parts:
        probe = probe / part
        if probe.is_symlink():
            raise Refused(f"symlink in path: {'/'.join(parts)}")
    try:
        info = os.lstat(path)
    except OSError:  # does not exist (yet): nothing to leak
        return path
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        raise Refused(f"hard-linked file: {'/'.join(parts)}")
    return path


def listable(info: os.stat_result) -> bool:
    """Whether a folder entry (``lstat`` result) is shown: folders and singly linked files.

    Symlinks, hard-linked files (see :func:`inside`), devices, FIFOs and sockets are
    never shown, since every other operation on them is refused.
    """
    if stat.S_ISDIR(info.st_mode):
        return True
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 1


def write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    """Write all of ``data`` at ``offset`` (``None``: at the current position), or raise.

    A write that fills the disk returns short first; writing the rest then fails with the
    real reason (``ENOSPC``), which is what the client and the log must see, not a vague
    "short write".
    """
    view = memoryview(data)
    while view:
        written = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        if written <= 0:  # pragma: no cover - POSIX reports a failed write as an error
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]
        if offset is not None:
            offset += written


def virtual(home: Path, real: Path) -> str:
    """The client's view of a real path under ``home``."""
    relative = real.relative_to(home)
    return "/" + relative.as_posix() if relative.parts else "/"


NAME_MAX = 255  # bytes in one file name, on Linux file systems


def partial_for(final: Path) -> Path:
    """A fresh hidden name beside ``final`` for the upload in progress.

    The name is cut so that the 15 bytes added still fit in ``NAME_MAX``: a final name of
    241-255 bytes is allowed, and its upload once failed with no reason given.
    """
    suffix = f".part-{secrets.token_hex(4)}"
    stem = os.fsencode(final.name)[: NAME_MAX - 1 - len(suffix)]
    return final.with_name(os.fsdecode(b"." + stem) + suffix)


Keep = Callable[[Path], None]
_REPLACING = threading.Lock()  # one replace at a time, across both servers' threads


def replace_into(source: Path, target: Path, keep: Keep | None = None) -> None:
    """``os.replace``, letting ``keep(target)`` first keep the file it replaces.

    The same name delivered again replaces the earlier delivery, which may not have been
    ingested yet: ``keep`` (the watcher's) links it aside first. Replaces are serialised,
    so two uploads of one name cannot both replace before either is kept.
    """
    with _REPLACING:
        if keep is not None and target.is_file() and not target.is_symlink():
            try:
                keep(target)
            except Exception:  # the upload itself must not fail for it
                log.exception("keeping %s before it is replaced failed", target)
        os.replace(source, target)


def publish(partial: Path, final: Path, keep: Keep | None = None) -> None:
    """Make a completed upload visible: stamp its delivery time, then rename it into place."""
    os.utime(partial)
    replace_into(partial, final, keep)


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
