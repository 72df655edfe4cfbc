"""The SFTP side of the drop box (asyncssh): SFTP only, each user confined to their folder,
and a file published under its final name only when its upload provably completed.

The trap this module exists to avoid
------------------------------------
asyncssh calls ``SFTPServer.close(file_obj)`` in two situations that look identical to
an ``SFTPServer`` subclass:

1. the client sent ``SSH_FXP_CLOSE`` for the handle: ``SFTPServerHandler._process_close``
   pops the handle and calls ``close()``.  SFTP requests on a channel are processed
   strictly in order (``SFTPHandler.recv_packets`` awaits each request before reading
   the next), so every ``SSH_FXP_WRITE`` the client sent before the close has been
   written.  This is the only proof that an upload is complete.
2. the session ended with the handle still open (TCP reset, client killed, channel EOF,
   keepalive timeout, server shutdown): ``SFTPServerHandler._cleanup`` calls ``close()``
   for every handle left in ``_file_handles``.  The file holds whatever arrived.

Publishing on every ``close()`` would therefore publish cut-off uploads, and the
processor would ingest them as if they were whole.  So uploads are written to a hidden
partial name (``drops.partial_for``); ``_DropSFTPHandler`` overrides the FXP_CLOSE entry
of asyncssh's dispatch table to mark "the client is closing" around asyncssh's own
``_process_close``; ``DropSFTPServer.close`` publishes (``drops.publish``: mtime = now,
then rename into place) only under that mark, and discards the partial otherwise.  To
install that handler, sessions are created by ``_SFTPOnlySession`` (returned from
``SSHServer.session_requested``) instead of asyncssh's ``sftp_factory`` plumbing, which
hard-wires ``SFTPServerHandler``.

asyncssh internals relied on (asyncssh 2.24; ``start_sftp_server`` refuses to start if
FXP_CLOSE is no longer dispatched to ``_process_close``, and the tests fail if the rest
changes -- in the safe direction: nothing would be published):
``SFTPServerHandler(server, reader, writer, version)``, its ``run()``, its class-level
``_packet_handlers`` / ``_extensions`` tables and ``_process_close``;
``asyncssh.stream.SSHServerStreamSession`` (``_init_sftp_server``, ``_chan``, ``_conn``)
and ``SSHReader``/``SSHWriter``.

Other rules: password and public-key logins only (no keyboard-interactive, host-based or
GSS), no shell/exec/SCP/pty/forwarding of any kind, modern algorithms only (no SHA-1,
no CBC, no ``ssh-rsa`` signatures; asyncssh adds strict kex against Terrapin), failed
passwords answered late and counted by the shared ``Guard``, banned addresses dropped
before the SSH handshake.  ``stop_sftp_server`` closes the live connections too (asyncssh's
``SSHAcceptor.close`` only stops listening), so uploads open at shutdown are discarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import asyncssh
from asyncssh.channel import SSHChannel
from asyncssh.encryption import get_encryption_algs
from asyncssh.kex import get_kex_algs
from asyncssh.mac import get_mac_algs
from asyncssh.packet import SSHPacket
from asyncssh.public_key import get_public_key_algs
from asyncssh.sftp import FXP_CLOSE, SFTPServerHandler
from asyncssh.stream import SSHReader, SSHServerStreamSession, SSHWriter

from fileserver import drops
from fileserver.guard import Guard
from fileserver.hostkeys import load_or_create_host_keys
from fileserver.users import UserStore

log = logging.getLogger("meterdrop.sftp")

SFTP_VERSION = 3  # what OpenSSH, paramiko and embedded clients speak; v4-v6 add nothing needed

# Modern algorithms only, best first.  asyncssh appends ext-info-s and
# kex-strict-s-v00@openssh.com (Terrapin countermeasure) to the kex list by itself.
KEX_ALGS = (
    "mlkem768x25519-sha256",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "curve448-sha512",
    "ecdh-sha2-nistp521",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp256",
    "diffie-hellman-group-exchange-sha256",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group14-sha256",
)
ENCRYPTION_ALGS = (
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)
MAC_ALGS = (  # only used with the CTR ciphers; no SHA-1, no 64-bit tags
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "umac-128-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
    "umac-128@openssh.com",
)
HOST_KEY_ALGS = ("ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256")
MAX_OPEN_UPLOADS = 64  # files one session may have open for writing at once
# copy_file_range cannot here: another file system, an old kernel, an O_APPEND partial (EBADF)
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF})
# Signatures accepted from clients' keys (and advertised in server-sig-algs): no ssh-rsa
# (SHA-1), no DSA.
CLIENT_SIG_ALGS = (
    "ssh-ed25519",
    "sk-ssh-ed25519@openssh.com",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "rsa-sha2-512",
    "rsa-sha2-256",
)
# Client key types whose keys may log in at all.
CLIENT_KEY_TYPES = frozenset(
    {
        b"ssh-ed25519",
        b"sk-ssh-ed25519@openssh.com",
        b"ecdsa-sha2-nistp256",
        b"ecdsa-sha2-nistp384",
        b"ecdsa-sha2-nistp521",
        b"sk-ecdsa-sha2-nistp256@openssh.com",
        b"ssh-rsa",  # the key type; its SHA-1 signature algorithm is refused below
    }
)
_CLIENT_SIGS = frozenset(alg.encode() for alg in CLIENT_SIG_ALGS)


def _available(wanted: Iterable[str], supported: Iterable[bytes]) -> list[str]:
    """``wanted`` in order, minus what this asyncssh/cryptography build cannot do."""
    have = set(supported)
    return [alg for alg in wanted if alg.encode() in have]


def _deny(what: str) -> asyncssh.SFTPError:
    return asyncssh.SFTPPermissionDenied(f"{what} is not allowed on this drop box")


# -- open files -------------------------------------------------------------------------
@dataclass(eq=False)
class _Download:
    """A file opened for reading: the user's own, already published file."""

    fd: int


@dataclass(eq=False)
class _Upload:
    """An upload in progress: written to ``partial``, published as ``final`` on completion."""

    fd: int
    partial: Path
    final: Path
    name: str  # the client's view, for logs
    append: bool
    started: float = field(default_factory=time.monotonic)
    failure: str | None = None  # set once a write was refused: never publish it
    received: int = 0  # bytes written so far, for the log
    base: int | None = None  # the delivered file an open without truncation starts from, not copied yet

    def materialize(self) -> None:
        """Start the partial as a copy of the delivered file, the first time it is needed.

        The copy was made at open: a client that opened a large delivery again and again
        without writing made a copy each time (the disk filled) and stalled every session
        while it ran. Now a handle never written costs nothing, and the copy is the
        kernel's (``copy_file_range``) where it can.
        """
        base, self.base = self.base, None
        if base is None:
            return
        try:
            size, copied = os.fstat(base).st_size, 0
            while copied < size:
                try:
                    step = os.copy_file_range(base, self.fd, size - copied, copied, copied)
                except OSError as error:
                    if error.errno not in _NO_COPY_RANGE:
                        raise
                    step = os.pwrite(self.fd, os.pread(base, min(1 << 20, size - copied), copied), copied)
                if step == 0:
                    break
                copied += step
        finally:
            os.close(base)

    def release(self) -> None:
        """Close the delivered file this upload would have started from, if still open."""
        base, self.base = self.base, None
        if base is not None:
            os.close(base)

    def fail(self, reason: str) -> None:
        """Refuse the rest of this upload and give its space back at once.

        Unlinking alone would not free the blocks while the descriptor stays open (until
        the client closes the handle), and on a full disk every block counts.
        """
        self.failure = reason
        self.release()
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        drops.discard(self.partial)


# -- the SFTP file system ---------------------------------------------------------------
class DropSFTPServer(asyncssh.SFTPServer):
    """One user's SFTP session: ``/`` is their drop folder; uploads publish on client close.

    Allowed: list, stat, mkdir, upload, download, rename (no overwrite; posix-rename may
    replace a file, as its specification says).  Refused with FX_PERMISSION_DENIED:
    delete, rmdir, set attributes (the server owns the modification time: it is the
    delivery time), symlinks, hard links, readlink, hidden names, anything outside.

    Writing to an existing file never touches it: the upload goes to a new partial and
    replaces the file atomically when the client closes it (like AWS Transfer Family's
    overwrite); an open without truncation starts the partial as a copy of the file, made
    when the handle is first written or read, so resumed/appending clients see the
    semantics they asked for (closed without either, it changes nothing). At most
    ``MAX_OPEN_UPLOADS`` files are open for writing per session.

    A write that fails (the disk is full: ``ENOSPC``, answered as FX_FAILURE "No space
    left on device" in SFTP v3) or passes the size limit ends the upload: the partial is
    truncated and removed at once, later writes are refused, and the client's close fails
    too, saying the file was not stored.  The session goes on; the next upload may succeed.
    """

    def __init__(
        self,
        chan: asyncssh.SSHServerChannel[bytes],
        *,
        username: str,
        home: Path,
        max_upload_bytes: int | None,
        on_published: Callable[[Path], None] | None,
        on_replacing: drops.Keep | None = None,
        account_stands: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__(chan)
        self._on_replacing = on_replacing
        self._account_stands = account_stands
        self._username = username
        self._home = home
        self._max = max_upload_bytes
        self._on_published = on_published
        self._open: set[_Upload | _Download] = set()
        # True only while asyncssh processes an SSH_FXP_CLOSE the client sent (see module doc).
        self.closing_by_client = False

    # -- paths ----------------------------------------------------------------------------
    def _real(self, path: bytes) -> Path:
        """The real path for a client path, or FX_PERMISSION_DENIED if it leaves the folder."""
        try:
            return drops.inside(self._home, path)
        except (drops.Refused, ValueError) as error:  # ValueError: not UTF-8
            raise asyncssh.SFTPPermissionDenied(str(error)) from None

    def realpath(self, path: bytes) -> bytes:
        return drops.virtual(self._home, self._real(path)).encode()

    def format_user(self, uid: int | None) -> str:
        return self._username  # not the server's account names

    def format_group(self, gid: int | None) -> str:
        return self._username

    # -- reading the tree -----------------------------------------------------------------
    def stat(self, path: bytes) -> os.stat_result:
        return os.stat(self._real(path))  # ``inside`` refused every symlink on the way

    def lstat(self, path: bytes) -> os.stat_result:
        return os.lstat(self._real(path))

    def fstat(self, file_obj: object) -> os.stat_result:
        handle = self._file(file_obj)
        if isinstance(handle, _Upload):
            handle.materialize()
        return os.fstat(handle.fd)

    def statvfs(self, path: bytes) -> os.statvfs_result:
        return os.statvfs(self._real(path))

    def fstatvfs(self, file_obj: object) -> os.statvfs_result:
        return os.fstatvfs(self._file(file_obj).fd)

    def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        """List a folder, eagerly (errors belong to OPENDIR), without dot-names or links."""
        real = self._real(path)
        here = os.stat(real)
        if not stat.S_ISDIR(here.st_mode):
            raise NotADirectoryError(20, "not a folder")
        # At the user's root, ".." is the root itself: the drop folder above is not theirs
        # to look at, not even its attributes.
        parent = here if real == self._home else os.stat(real.parent)
        names = [
            asyncssh.SFTPName(b".", attrs=asyncssh.SFTPAttrs.from_local(here)),
            asyncssh.SFTPName(b"..", attrs=asyncssh.SFTPAttrs.from_local(parent)),
        ]
        with os.scandir(real) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # partial uploads and other reserved names
                info = entry.stat(follow_symlinks=False)
                if drops.listable(info):  # no symlinks or hard-linked files (see drops.inside)
                    names.append(
                        asyncssh.SFTPName(os.fsencode(entry.name), attrs=asyncssh.SFTPAttrs.from_local(info))
                    )

        async def listing() -> AsyncIterator[asyncssh.SFTPName]:
            for name in names:
                yield name

        return listing()

    # -- changing the tree ----------------------------------------------------------------
    def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        self._still_allowed()
        os.mkdir(self._real(path), 0o755)  # requested permissions are ignored

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        self._rename(oldpath, newpath, replace=False)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        self._rename(oldpath, newpath, replace=True)

    def _rename(self, oldpath: bytes, newpath: bytes, *, replace: bool) -> None:
        """Rename within the folder; the classic RENAME never replaces an existing name."""
        self._still_allowed()
        source, target = self._real(oldpath), self._real(newpath)
        if self._home in (source, target):
            raise _deny("renaming the top folder")
        info = os.lstat(source)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
            raise _deny("renaming this kind of file")
        if os.path.lexists(target):
            if not replace:
                raise asyncssh.SFTPFileAlreadyExists(f"{drops.virtual(self._home, target)} exists")
            if stat.S_ISDIR(info.st_mode) or not target.is_file():
                raise _deny("replacing a folder")
            drops.replace_into(source, target, self._on_replacing)
        else:
            os.rename(source, target)
        log.info(
            "sftp rename user=%s %s -> %s",
            self._username,
            oldpath.decode(errors="replace"),
            newpath.decode(errors="replace"),
        )
        if stat.S_ISREG(info.st_mode):
            self._notify(target)
        else:
            # A folder renamed in whole: tell the processor about its files, but never about
            # a symlink or hard link planted in it (is_file() follows links: the processor
            # would ingest whatever file outside the folder the link leads to).
            for found in sorted(target.rglob("*")):
                if any(p.startswith(".") for p in found.relative_to(target).parts):
                    continue
                info = os.lstat(found)
                if stat.S_ISREG(info.st_mode) and drops.listable(info):
                    self._notify(found)

    def remove(self, path: bytes) -> None:
        raise _deny("deleting files")

    def rmdir(self, path: bytes) -> None:
        raise _deny("deleting folders")

    def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        raise _deny("changing attributes (the server sets the delivery time)")

    def lsetstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        raise _deny("changing attributes (the server sets the delivery time)")

    def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        raise _deny("changing attributes (the server sets the delivery time)")

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        raise _deny("creating symlinks")

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        raise _deny("creating hard links")

    def readlink(self, path: bytes) -> bytes:
        raise _deny("reading symlinks")

    # -- files ------------------------------------------------------------------------------
    def _still_allowed(self) -> None:
        """`meterdrop users remove` or `passwd` revokes what this session was let in with."""
        if not self._account_stands():
            log.warning("sftp user=%s refused: account removed or changed since login", self._username)
            raise asyncssh.SFTPPermissionDenied("your account was removed or changed: log in again")

    def _file(self, file_obj: object) -> _Upload | _Download:
        if not isinstance(file_obj, _Upload | _Download):  # pragma: no cover - asyncssh passes ours
            raise asyncssh.SFTPInvalidHandle("not a file handle")
        return file_obj

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        self._still_allowed()
        real = self._real(path)
        if pflags & (asyncssh.FXF_WRITE | asyncssh.FXF_APPEND):
            handle: _Upload | _Download = self._open_upload(real, pflags)
        else:
            handle = self._open_download(real)
        self._open.add(handle)
        return handle

    def _open_download(self, real: Path) -> _Download:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise asyncssh.SFTPFileIsADirectory("not a regular file")
        return _Download(fd)

    def _open_upload(self, real: Path, pflags: int) -> _Upload:
        if real == self._home:
            raise asyncssh.SFTPFileIsADirectory("/ is a folder")
        if not real.parent.is_dir():
            raise asyncssh.SFTPNoSuchFile(f"no folder {drops.virtual(self._home, real.parent)}")
        existing = os.lstat(real) if os.path.lexists(real) else None
        if existing is not None:
            if not stat.S_ISREG(existing.st_mode):
                raise asyncssh.SFTPFileIsADirectory("not a regular file")
            if pflags & asyncssh.FXF_EXCL:
                raise asyncssh.SFTPFileAlreadyExists(f"{drops.virtual(self._home, real)} exists")
        elif not pflags & asyncssh.FXF_CREAT:
            raise asyncssh.SFTPNoSuchFile(f"no file {drops.virtual(self._home, real)}")
        keep = existing is not None and not pflags & asyncssh.FXF_TRUNC
        if keep and existing is not None and self._max is not None and existing.st_size > self._max:
            raise asyncssh.SFTPQuotaExceeded(f"files are limited to {self._max} bytes")
        append = bool(pflags & asyncssh.FXF_APPEND)
        partial = drops.partial_for(real)
        flags = (
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if append else 0)
        )
        if sum(isinstance(handle, _Upload) for handle in self._open) >= MAX_OPEN_UPLOADS:
            raise asyncssh.SFTPFailure(f"more than {MAX_OPEN_UPLOADS} files open for writing at once")
        # The client modifies the delivered file: the partial starts from its content, copied
        # when first needed (``_Upload.materialize``).
        base = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC) if keep else None
        try:
            fd = os.open(partial, flags, 0o644)
        except BaseException:
            if base is not None:
                os.close(base)
            raise
        return _Upload(fd, partial, real, drops.virtual(self._home, real), append, base=base)

    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        handle = self._file(file_obj)
        if isinstance(handle, _Upload):
            handle.materialize()
        return os.pread(handle.fd, size, offset)

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        upload = self._file(file_obj)
        if not isinstance(upload, _Upload):
            raise asyncssh.SFTPPermissionDenied("file opened for reading")
        if upload.failure is not None:
            raise asyncssh.SFTPFailure(upload.failure)
        try:
            upload.materialize()
        except OSError as error:
            upload.fail(f"copy of the delivered file failed: {error.strerror or error}")
            raise
        end = (os.fstat(upload.fd).st_size if upload.append else offset) + len(data)
        if self._max is not None and end > self._max:
            reason = f"upload refused: files are limited to {self._max} bytes"
            upload.fail(reason)
            log.warning(
                "sftp upload user=%s path=%s refused: over %d bytes", self._username, upload.name, self._max
            )
            raise asyncssh.SFTPQuotaExceeded(reason)
        try:
            drops.write_all(upload.fd, data, None if upload.append else offset)
        except OSError as error:
            # Typically ENOSPC: the disk is full.  asyncssh answers the OSError itself (v3:
            # FX_FAILURE "No space left on device"); the partial goes now, so that the
            # space it held is free again for the next upload.
            upload.fail(f"write failed: {error.strerror or error}")
            log.error(
                "sftp upload user=%s path=%s write failed after %d bytes: %s: discarded",
                self._username,
                upload.name,
                upload.received,
                error.strerror or error,
            )
            raise
        upload.received += len(data)
        return len(data)

    def fsync(self, file_obj: object) -> None:
        os.fsync(self._file(file_obj).fd)

    def close(self, file_obj: object) -> None:
        """Publish an upload if the client closed it; otherwise it did not complete: discard."""
        handle = self._file(file_obj)
        if handle not in self._open:
            return  # closed already: never close a file descriptor twice
        self._open.discard(handle)
        if isinstance(handle, _Download):
            os.close(handle.fd)
            return
        untouched = handle.base is not None  # opened without truncation, never written or read
        handle.release()
        try:
            size = os.fstat(handle.fd).st_size
        finally:
            os.close(handle.fd)
        seconds = time.monotonic() - handle.started
        if self.closing_by_client and handle.failure is None and not self._account_stands():
            handle.failure = "the account was removed or changed during the upload"
        if untouched and handle.failure is None:
            drops.discard(handle.partial)  # the delivered file is as it was: nothing to publish
            log.info(
                "sftp open user=%s path=%s closed without a write: unchanged", self._username, handle.name
            )
            return
        if not self.closing_by_client or handle.failure is not None:
            reason = handle.failure or "session ended before the client closed the file"
            drops.discard(handle.partial)
            log.warning(
                "sftp upload user=%s path=%s bytes=%d seconds=%.2f incomplete (%s): discarded",
                self._username,
                handle.name,
                max(size, handle.received),
                seconds,
                reason,
            )
            if self.closing_by_client:
                # The client may not have looked at every write's status (OpenSSH and
                # asyncssh pipeline them): the close says it again, so nobody takes a
                # refused upload for a delivered one.
                raise asyncssh.SFTPFailure(f"{handle.name} not stored: {reason}")
            return
        try:
            drops.publish(handle.partial, handle.final, self._on_replacing)
        except OSError as error:  # e.g. the folder was renamed meanwhile
            drops.discard(handle.partial)
            log.warning(
                "sftp upload user=%s path=%s could not be published: %s", self._username, handle.name, error
            )
            raise asyncssh.SFTPFailure(f"could not store {handle.name}: {error.strerror or error}") from None
        log.info(
            "sftp upload user=%s path=%s bytes=%d seconds=%.2f complete",
            self._username,
            handle.name,
            size,
            seconds,
        )
        self._notify(handle.final)

    def _notify(self, path: Path) -> None:
        if self._on_published is None:
            return
        try:
            self._on_published(path)
        except Exception:  # the file is safely published; the watcher's scan will find it
            log.exception("on_published failed for %s", path)

    def exit(self) -> None:
        """Session over: anything asyncssh did not close is incomplete by definition."""
        for handle in list(self._open):
            self.closing_by_client = False
            self.close(handle)


# -- the SSH plumbing -------------------------------------------------------------------
_KEPT_EXTENSIONS = {
    b"newline",
    b"vendor-id",
    b"posix-rename@openssh.com",
    b"fsync@openssh.com",
    b"limits@openssh.com",
    b"statvfs@openssh.com",
    b"fstatvfs@openssh.com",
}
_DROPPED_REQUESTS = {b"hardlink@openssh.com", b"lsetstat@openssh.com", b"copy-data", b"ranges@asyncssh.com"}


class _DropSFTPHandler(SFTPServerHandler):
    """asyncssh's SFTP server loop, telling ``DropSFTPServer`` which closes the client sent."""

    # asyncssh keeps both tables as class attributes; these are this subclass's copies.
    _extensions: list[tuple[bytes, bytes]] = [  # noqa: RUF012
        (name, data) for name, data in SFTPServerHandler._extensions if name in _KEPT_EXTENSIONS
    ]

    def __init__(self, server: DropSFTPServer, reader: SSHReader[bytes], writer: SSHWriter[bytes]) -> None:
        super().__init__(server, reader, writer, SFTP_VERSION)
        self._drop = server

    async def _process_client_close(self, packet: SSHPacket) -> None:
        """SSH_FXP_CLOSE from the client: the one close that proves an upload complete."""
        self._drop.closing_by_client = True
        try:
            await self._process_close(packet)
        finally:
            self._drop.closing_by_client = False

    _packet_handlers: dict[int | bytes, Any] = {  # noqa: RUF012
        **{
            kind: fn
            for kind, fn in SFTPServerHandler._packet_handlers.items()
            if kind not in _DROPPED_REQUESTS
        },
        FXP_CLOSE: cast(Any, _process_client_close),
    }


class _SFTPOnlySession(SSHServerStreamSession[bytes]):
    """A session channel that accepts the ``sftp`` subsystem and nothing else."""

    def __init__(
        self, make_server: Callable[[SSHChannel[bytes]], DropSFTPServer], sessions: set[asyncio.Task[None]]
    ) -> None:
        super().__init__(None, make_server, SFTP_VERSION, allow_scp=False)
        self._sessions = sessions

    def pty_requested(self, term_type: str, term_size: Any, term_modes: Any) -> bool:
        return False

    def shell_requested(self) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        return False  # this also refuses SCP, which runs as "scp -t ..."

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == "sftp"

    def session_started(self) -> None:
        chan, conn = self._chan, self._conn
        assert chan is not None and conn is not None
        if chan.get_subsystem() != "sftp":  # pragma: no cover - every other request was refused
            chan.close()
            return
        server = cast(DropSFTPServer, self._init_sftp_server())
        reader, writer = SSHReader[bytes](self, chan), SSHWriter[bytes](self, chan)
        handler = _DropSFTPHandler(server, reader, writer)
        task = conn.create_task(handler.run(), reader.logger)
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)


@dataclass
class _Settings:
    users: UserStore
    guard: Guard
    max_upload_bytes: int | None
    on_published: Callable[[Path], None] | None
    on_replacing: drops.Keep | None
    connections: set[asyncssh.SSHServerConnection] = field(default_factory=set)
    sessions: set[asyncio.Task[None]] = field(default_factory=set)  # running SFTP handlers


# What each running server has open, for ``stop_sftp_server``.
_LIVE: weakref.WeakKeyDictionary[asyncssh.SSHAcceptor, _Settings] = weakref.WeakKeyDictionary()


class _DropSSHServer(asyncssh.SSHServer):
    """One connection: bans, logins, and an SFTP-only session."""

    def __init__(self, settings: _Settings) -> None:
        self._settings = settings
        self._conn: asyncssh.SSHServerConnection | None = None
        self._address = "?"
        self._peer = "?"
        self._method = "?"
        self._verifying = asyncio.Lock()

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._settings.connections.add(conn)
        peer = conn.get_extra_info("peername") or ("?", 0)
        self._address, self._peer = str(peer[0]), f"{peer[0]}:{peer[1]}"
        if self._settings.guard.is_banned(self._address):
            log.warning("sftp %s: connection refused: address is banned", self._peer)
            conn.abort()  # before the handshake: a banned address costs no key exchange
            return
        log.info("sftp %s: connection", self._peer)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._settings.connections.discard(self._conn)
        log.debug("sftp %s: connection closed%s", self._peer, f" ({exc})" if exc else "")

    def _refuse_if_banned(self) -> None:
        if self._settings.guard.is_banned(self._address):
            raise asyncssh.DisconnectError(
                asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "too many failed logins: try again later"
            )

    def begin_auth(self, username: str) -> bool:
        self._refuse_if_banned()
        return True  # always authenticate, whether or not the user exists

    def auth_completed(self) -> None:
        self._settings.guard.succeeded(self._address)
        log.info("sftp %s: login user=%s method=%s", self._peer, self._username(), self._method)

    def _username(self) -> str:
        return str(self._conn.get_extra_info("username")) if self._conn else "?"

    def password_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        """Check the password off the event loop; answer a wrong one late, and count it."""
        self._refuse_if_banned()
        # One verification at a time per connection: a client pipelining attempts cancels
        # the ones still waiting here, so they cost no argon2 work and learn nothing.
        async with self._verifying:
            ok = await asyncio.to_thread(self._settings.users.verify_password, username, password)
        if ok:
            self._method = "password"
            return True
        delay = self._settings.guard.failed(self._address)  # counted before any await
        banned = self._settings.guard.is_banned(self._address)
        log.warning(
            "sftp %s: login failed user=%s method=password%s",
            self._peer,
            username,
            ": address banned" if banned else "",
        )
        await asyncio.sleep(delay)
        self._refuse_if_banned()
        return False

    def kbdint_auth_supported(self) -> bool:
        return False  # otherwise asyncssh maps keyboard-interactive onto passwords

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """True for a key in the user's authorized keys; SHA-1 signatures are then refused."""
        if key.algorithm not in CLIENT_KEY_TYPES:
            return False
        for line in self._settings.users.authorized_keys(username):
            try:
                allowed = asyncssh.import_public_key(line)
            except (asyncssh.KeyImportError, ValueError):
                continue
            if allowed.public_data == key.public_data:
                # asyncssh checks the signature with key.verify(), which accepts any of the
                # key class's algorithms; narrowing them on this instance refuses ssh-rsa.
                key.all_sig_algorithms = set(key.all_sig_algorithms) & _CLIENT_SIGS
                self._method = "publickey"
                return True
        log.debug("sftp %s: public key %s not authorized for %s", self._peer, key.get_fingerprint(), username)
        return False

    def session_requested(self) -> _SFTPOnlySession:
        return _SFTPOnlySession(self._make_sftp_server, self._settings.sessions)

    def _make_sftp_server(self, chan: SSHChannel[bytes]) -> DropSFTPServer:
        username = str(chan.get_extra_info("username"))
        users = self._settings.users
        account = users.get(username)  # as it was at login
        return DropSFTPServer(
            cast(asyncssh.SSHServerChannel[bytes], chan),
            username=username,
            home=self._settings.users.home(username),
            max_upload_bytes=self._settings.max_upload_bytes,
            on_published=self._settings.on_published,
            on_replacing=self._settings.on_replacing,
            account_stands=lambda: account is not None and users.get(username) == account,
        )


def _host_keypairs(keys: list[asyncssh.SSHKey]) -> list[asyncssh.SSHKeyPair]:
    """Key pairs offering only SHA-2 (and Ed25519) host key signatures: never ssh-rsa."""
    wanted = [alg.encode() for alg in HOST_KEY_ALGS]
    pairs = asyncssh.load_keypairs(keys)
    for pair in pairs:
        pair.host_key_algorithms = [alg for alg in pair.host_key_algorithms if alg in wanted]
    return [pair for pair in pairs if pair.host_key_algorithms]


async def start_sftp_server(
    *,
    host: str,
    port: int,
    users: UserStore,
    guard: Guard,
    certs_dir: Path,
    max_upload_bytes: int | None = None,
    on_published: Callable[[Path], None] | None = None,
    on_replacing: drops.Keep | None = None,
) -> asyncssh.SSHAcceptor:
    """Listen for SFTP on ``host:port`` (0: any free port; see ``acceptor.sockets``).

    ``on_published(path)`` is called (on the event loop) each time a complete file
    appears under a final name: an upload the client closed, or a rename.
    ``on_replacing(path)`` is called just before an upload or a rename replaces the file
    at ``path`` (``drops.replace_into``).
    """
    if SFTPServerHandler._packet_handlers.get(FXP_CLOSE) is not SFTPServerHandler._process_close:
        # Without this hook no close could be told from a disconnect (see module doc).
        raise RuntimeError(
            f"asyncssh {asyncssh.__version__} dispatches SSH_FXP_CLOSE differently: update sftp.py"
        )
    settings = _Settings(users, guard, max_upload_bytes, on_published, on_replacing)
    acceptor = await asyncssh.create_server(
        lambda: _DropSSHServer(settings),
        host,
        port,
        server_host_keys=_host_keypairs(load_or_create_host_keys(certs_dir)),
        server_version="meterdrop",
        kex_algs=_available(KEX_ALGS, get_kex_algs()),
        encryption_algs=_available(ENCRYPTION_ALGS, get_encryption_algs()),
        mac_algs=_available(MAC_ALGS, get_mac_algs()),
        signature_algs=_available(CLIENT_SIG_ALGS, get_public_key_algs()),
        compression_algs=["none", "zlib@openssh.com"],
        authorized_client_keys=None,
        password_auth=True,
        public_key_auth=True,
        kbdint_auth=False,
        host_based_auth=False,
        gss_host=None,
        allow_pty=False,
        x11_forwarding=False,
        agent_forwarding=False,
        login_timeout=60,
        keepalive_interval=30,  # a vanished client is noticed (and its partial discarded)
        keepalive_count_max=4,
    )
    _LIVE[acceptor] = settings
    return acceptor


async def stop_sftp_server(acceptor: asyncssh.SSHAcceptor, timeout: float = 5.0) -> None:
    """Stop listening and close every connection (asyncssh's ``close()`` leaves them open).

    Uploads still open are incomplete and discarded, as after any other disconnect.
    """
    acceptor.close()
    settings = _LIVE.pop(acceptor, None)
    if settings is not None:
        for conn in list(settings.connections):
            conn.disconnect(asyncssh.DISC_BY_APPLICATION, "server shutting down")
        # Each SFTP handler task ends after its cleanup (the discards) ran.
        waits: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(c.wait_closed()) for c in settings.connections
        ]
        waits += list(settings.sessions)
        if waits:
            await asyncio.wait(waits, timeout=timeout)
    await acceptor.wait_closed()
