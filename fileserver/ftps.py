"""Explicit FTPS drop server (pyftpdlib + pyOpenSSL) that behaves like AWS Transfer Family.

What a client gets
------------------
* Explicit TLS only: ``AUTH TLS`` before ``USER``/``PASS`` (a plain-text login is answered
  ``530`` with the reason), TLS 1.2 or 1.3, ECDHE key exchange with AEAD ciphers only,
  no compression or renegotiation.  Every data connection is protected (``PBSZ 0`` +
  ``PROT P`` before ``PASV``/``EPSV``, else ``521``; ``PROT C`` is refused with ``534``).
* Users and passwords from :class:`~fileserver.users.UserStore` (no anonymous access), each
  confined to ``DATA_DIR/drop/<user>/`` through :func:`fileserver.drops.inside`: ``..``
  cannot climb out, absolute paths are relative to that folder, NUL bytes, hidden names and
  any symlink on the way are refused, and so is a hard-linked file (planted from outside);
  listings hide dot-files (uploads in progress), symlinks and hard-linked files.
  Allowed: CWD, LIST/NLST/MLSD/MLST/STAT/SIZE/MDTM, MKD, STOR, RNFR/RNTO, RETR.
  Refused with a reason: DELE, RMD/XRMD, SITE CHMOD, MFMT (the modification time is the
  delivery time newest-wins relies on; a client must not backdate it), APPE and REST before
  STOR (an upload is always a whole new file: appending to or resuming a file that may
  already have been ingested would make a half-written file visible), STOU, and active
  mode (PORT/EPRT: ``502``).  None of them is advertised in FEAT.
* Binary only: ``TYPE I`` (the default, also after ``REIN``) is accepted, ``TYPE A`` is
  answered ``504``; pyftpdlib would otherwise rewrite line endings.  Listings are sent in
  binary too, so clients that switch to ``TYPE A`` before listing (``curl ftp://host/dir/``,
  Python's ``ftplib`` ``nlst()``/``dir()``/``mlsd()``) cannot list; uploads, downloads and
  binary-type listings are unaffected.
* Passive only, ports from ``passive_ports``.  pyftpdlib's ``PassiveDTP`` falls back to a
  kernel-chosen port outside the range when every port is taken (and only logs a warning);
  :class:`_PassiveListener` answers ``425`` instead and never binds outside the range.
  ``public_host`` is announced in ``227`` replies (NAT, containers).  A data connection
  from any address other than the control connection's is refused (``425``; pyftpdlib's
  ``permit_foreign_addresses = False``, kept).
* Limits: connections per address, idle timeout (control channel and stalled transfers),
  maximum upload size (``552``, and the upload is discarded).  A full disk (``ENOSPC``) ends
  the upload with ``452`` once the client has sent its data (the partial is removed at the
  failed write, so the space is free again at once); see :class:`Upload`.
* Brute force: a failed password scores against the address in the shared
  :class:`~fileserver.guard.Guard`; the ``530`` is sent only after the guard's delay
  (scheduled on the IO loop, which never sleeps); a banned address gets ``421`` on connect
  and on ``PASS``.  Password hashes (argon2, ~0.1 s each) are verified on a small thread
  pool, so a login never stalls the other sessions' transfers.

Complete uploads only
---------------------
pyftpdlib decides an upload finished when the data connection reads as closed, and calls
``on_file_received`` after replying ``226``.  Over TLS that is not evidence of anything:
``SSLConnectionMixin.recv`` maps both ``SSL.ZeroReturnError`` (the client's TLS
``close_notify``: "I have sent everything") and ``SSL.SysCallError(-1, 'Unexpected EOF')``
(the TCP connection simply ended: cable pulled, process killed, client crashed mid-way)
to the same ``handle_close()``, so a truncated file would be reported complete and the
processor would ingest half a delivery.  Here:

1. ``STOR`` writes to a hidden partial name beside the final one
   (:func:`fileserver.drops.partial_for`), created with ``O_EXCL | O_NOFOLLOW``.
2. When the data channel closes for the first time (:meth:`_DataChannel.close`, before
   pyftpdlib's own TLS shutdown runs: ``SSLConnectionMixin._do_ssl_shutdown`` sets
   ``RECEIVED_SHUTDOWN`` on the connection itself to skip waiting for the peer, which is why
   the state must be read first), the upload is settled:

   * it is **published** (:func:`fileserver.drops.publish`: mtime = now, then an atomic
     rename to the final name; then ``on_published(final)``) only if pyftpdlib considers the
     transfer finished (the peer closed it; not ``ABOR``, not a timeout, not our own close)
     **and** OpenSSL recorded the client's ``close_notify``
     (``Connection.get_shutdown() & SSL.RECEIVED_SHUTDOWN``, set by OpenSSL when it reads the
     alert, i.e. exactly when ``recv`` raised ``ZeroReturnError``) **and** the size limit
     was not exceeded **and** every write succeeded.  The ``226`` reply is sent after the
     rename succeeded; if the rename fails the client gets ``451`` (``452`` for a full disk).
   * otherwise it is **discarded** (:func:`fileserver.drops.discard`).  A connection that
     ended without ``close_notify`` gets ``426`` instead of pyftpdlib's ``226``; ``ABOR``
     gets pyftpdlib's ``426``/``226`` pair; the size limit ``552``; a failed write ``452``
     (disk full) or ``451``.

3. Uploads that never got a data connection (``STOR`` then disconnect, ``REIN``, a second
   ``STOR``) are discarded when the session ends or the queued upload is replaced.  So is
   an upload whose control connection ends before the data connection's end was read: the
   client never got a ``226``, and only a ``226`` counts.

Partials left behind by a crash of the whole process are hidden names, which the processor
never ingests; they are not swept up here.

TLS session reuse on the data channel
-------------------------------------
AWS Transfer Family enforces by default that each data connection resumes the control
connection's TLS session, so that whoever connects to the passive port must hold that
session's secrets.  ``tls_session_resumption`` mirrors its setting: ``"enforced"`` refuses a
data connection that did not resume a session (``522``), ``"enabled"`` (the default here,
because Python's ``ftplib`` never resumes sessions) accepts both, ``"disabled"`` turns
session caching and tickets off.  Each control connection gets its own ``SSL.Context`` (about
0.1 ms), so its session cache and ticket keys are private to it: a data connection can only
resume *this* control connection's session, and ``SSL_session_reused`` (read through
pyOpenSSL's cffi binding, ``OpenSSL._util.lib``, since pyOpenSSL has no public wrapper for
it) is a sufficient check.

Also fixed on the data channel: pyftpdlib starts pushing a listing or download before the
TLS handshake and busy-loops on write events until the client's hello arrives; an empty
listing or file was then closed mid-handshake (or ``SSL_write(b"")`` failed), which clients
saw as a broken connection or ``426``.  Output now waits for the handshake.

Threading: pyftpdlib is single-threaded; the server runs its own IO loop in one background
thread, never the process-wide ``IOLoop.instance()``, and never changes the process's
working directory (pyftpdlib's ``AbstractedFS.chdir`` would, under the other servers'
threads).  ``on_published`` is called on that thread and must return quickly.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import random
import socket
import stat
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal

from OpenSSL import SSL
from OpenSSL._util import lib as _ssl_lib
from pyftpdlib.authorizers import AuthenticationFailed
from pyftpdlib.exceptions import FilesystemError, _RetryError
from pyftpdlib.filesystems import AbstractedFS
from pyftpdlib.handlers import TLS_DTPHandler, TLS_FTPHandler
from pyftpdlib.handlers.ftp.dispatchers import PassiveDTP
from pyftpdlib.ioloop import Acceptor, IOLoop
from pyftpdlib.log import logger as _pyftpdlib_logger
from pyftpdlib.servers import FTPServer

from . import drops
from .guard import Guard
from .tlscert import ensure_certificate
from .users import User, UserStore

log = logging.getLogger("meterdrop.ftps")

SessionResumption = Literal["disabled", "enabled", "enforced"]

# Forward secrecy and AEAD only (TLS 1.2); TLS 1.3 suites are OpenSSL's defaults (all AEAD).
TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

# Permissions (pyftpdlib letters): e=CWD, l=list, r=RETR, m=MKD, w=STOR, f=RNFR/RNTO.
# Not granted: a=APPE, d=DELE/RMD, M=SITE CHMOD, T=MFMT.
PERMISSIONS = "elrmwf"

ACTIVE_MODE_REFUSED = "502 Active mode (PORT/EPRT) is not supported: use passive mode (PASV or EPSV)."
# Commands removed from the protocol table (so FEAT and HELP do not offer them), each with
# the reply that says why.
REFUSED_COMMANDS: dict[str, str] = {
    "PORT": ACTIVE_MODE_REFUSED,
    "EPRT": ACTIVE_MODE_REFUSED,
    "DELE": "550 Deleting files is not allowed on this drop box.",
    "RMD": "550 Removing folders is not allowed on this drop box.",
    "XRMD": "550 Removing folders is not allowed on this drop box.",
    "SITE CHMOD": "550 Changing permissions is not allowed on this drop box.",
    "MFMT": "550 Setting modification times is not allowed: the server stamps each upload's delivery time.",
    "APPE": "502 APPE is not supported: upload the whole file with STOR.",
    "STOU": "502 STOU is not supported: upload with STOR and a file name.",
}

# pyftpdlib's own limit for one command line (RFC 959 sets none; paths are far shorter).
MAX_COMMAND_BYTES = 2048
PASV_WAIT_SECONDS = 2.0  # how long a PASV/EPSV waits for a passive port to free before 425
PASV_RETRY_SECONDS = 0.05

_BANNED_REPLY = "421 Too many failed logins from your address: try again later."
_SSL_session_reused: Callable[[Any], int] | None = getattr(_ssl_lib, "SSL_session_reused", None)


class PassivePortsBusy(OSError):
    """Every port of the passive range has a listener waiting; answer 425, never go outside."""


def _close_notify_received(conn: object) -> bool:
    """Whether OpenSSL has read the peer's TLS close_notify alert on this connection."""
    if not isinstance(conn, SSL.Connection):
        return False
    try:
        return bool(conn.get_shutdown() & SSL.RECEIVED_SHUTDOWN)
    except SSL.Error:
        return False


def _session_reused(conn: object) -> bool:
    if not isinstance(conn, SSL.Connection) or _SSL_session_reused is None:
        return False
    return bool(_SSL_session_reused(conn._ssl))


# ----------------------------------------------------------------------------------------
# users, file system, uploads
# ----------------------------------------------------------------------------------------
class UserStoreAuthorizer:
    """pyftpdlib authorizer over the shared user store: password users only, fixed permissions."""

    def __init__(self, users: UserStore) -> None:
        self.users = users

    def validate_authentication(self, username: str, password: str, handler: object) -> None:
        """Raise ``AuthenticationFailed`` unless the password is right (runs on a worker thread)."""
        if not self.users.verify_password(username, password):
            raise AuthenticationFailed("Login incorrect.")

    def get_home_dir(self, username: str) -> str:
        return str(self.users.home(username).resolve())

    def has_user(self, username: str) -> bool:
        return self.users.get(username) is not None

    def has_perm(self, username: str, perm: str, path: str | None = None) -> bool:
        return perm in PERMISSIONS

    def get_perms(self, username: str) -> str:
        return PERMISSIONS

    def get_msg_login(self, username: str) -> str:
        return "Login successful."

    def get_msg_quit(self, username: str) -> str:
        return "Goodbye."

    def impersonate_user(self, username: str, password: str) -> None:
        pass

    def terminate_impersonation(self, username: str) -> None:
        pass


class DropFilesystem(AbstractedFS):
    """The user's folder as ``/``; every client path goes through :func:`drops.inside`."""

    def __init__(self, root: str, cmd_channel: Any) -> None:
        super().__init__(root, cmd_channel)
        self.home = Path(root)

    def ftp2fs(self, ftppath: str) -> str:
        # Raises drops.Refused, which the control channel turns into a 550 with the reason.
        return str(drops.inside(self.home, ftppath, self.cwd))

    def chdir(self, path: str) -> None:
        # Unlike AbstractedFS.chdir, never os.chdir(): the process is shared with other servers.
        mode = os.lstat(path).st_mode
        if not stat.S_ISDIR(mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        if not os.access(path, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        self.cwd = self.fs2ftp(path)

    def listdir(self, path: str) -> list[str]:
        """Names to list: no dot-names (uploads in progress), symlinks or hard-linked files."""
        shown = []
        for name in os.listdir(path):
            if name.startswith("."):
                continue
            try:
                info = os.lstat(os.path.join(path, name))
            except OSError:  # gone meanwhile
                continue
            if drops.listable(info):
                shown.append(name)
        return shown

    listdirinfo = listdir

    def open(self, filename: str, mode: str) -> Any:
        if set(mode) - {"r", "b"}:
            raise FilesystemError("uploads are accepted through STOR only")
        return open(filename, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW))

    def mkstemp(self, *args: Any, **kwargs: Any) -> Any:
        raise FilesystemError("STOU is not supported")

    def rename(self, src: str, dst: str) -> None:
        """RNTO: onto a file, it replaces it (the earlier delivery kept first); never onto a folder."""
        if os.path.isdir(dst) and not os.path.islink(dst):
            raise FilesystemError("a folder of that name exists (replacing it would remove it)")
        if os.path.lexists(dst):
            drops.replace_into(Path(src), Path(dst), self.cmd_channel.owner.on_replacing)
        else:
            os.rename(src, dst)

    def rmdir(self, path: str) -> None:
        raise FilesystemError("removing folders is not allowed")

    def remove(self, path: str) -> None:
        raise FilesystemError("deleting files is not allowed")

    def chmod(self, path: str, mode: int) -> None:
        raise FilesystemError("changing permissions is not allowed")

    def utime(self, path: str, timeval: float) -> None:
        raise FilesystemError("setting modification times is not allowed")


class Upload:
    """A file being received: written to a hidden partial name, published only when complete.

    Quacks like the file object pyftpdlib's data channel writes to (``write``, ``close``,
    ``closed``, ``name``).  Writes go straight to the file descriptor, unbuffered (pyftpdlib
    hands over 64 KiB at a time): with a buffer, a full disk would surface at some later
    write or only in ``close()``, which pyftpdlib does not expect to fail (it left the
    session hanging without a reply, the partial on the full disk).

    A write that fails (``ENOSPC``: the disk is full) does not raise into pyftpdlib:
    the upload is marked failed, the partial is truncated and removed at once (its space
    is free again for other uploads), and the rest of the data is read and dropped, so
    the client finishes sending and then reads the ``452``/``451`` reply that says why,
    instead of a connection reset in the middle of its upload.
    """

    def __init__(self, final: Path, virtual: str, user: str = "-") -> None:
        self.final = final
        self.virtual = virtual
        self.user = user
        self.partial = drops.partial_for(final)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd: int | None = os.open(self.partial, flags, 0o644)
        self.name = str(self.partial)
        self.state: Literal["receiving", "published", "discarded"] = "receiving"
        self.failure: OSError | None = None  # the write error that ended this upload
        self.stored = 0  # bytes on disk before a failure, for the log

    @property
    def closed(self) -> bool:
        return self._fd is None

    def write(self, data: bytes) -> int:
        if self.failure is not None or self._fd is None:
            return len(data)  # failed: drained, not stored (see the class doc)
        try:
            drops.write_all(self._fd, data)
        except OSError as error:
            self.failure = error
            log.error(
                "ftps upload user=%s path=%s write failed after %d bytes: %s: discarded, draining the rest",
                self.user,
                self.virtual,
                self.stored,
                error.strerror or error,
            )
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # unlinking alone frees nothing while it is open
            self.close()
            self.discard()
        else:
            self.stored += len(data)
        return len(data)

    def close(self) -> None:
        """Close the partial's descriptor; never raises (pyftpdlib calls it while closing)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def publish(self, keep: drops.Keep | None = None) -> None:
        self.close()
        drops.publish(self.partial, self.final, keep)
        self.state = "published"

    def discard(self) -> None:
        if self.state != "receiving":
            return
        self.state = "discarded"
        self.close()
        drops.discard(self.partial)


def _write_failed_reply(error: OSError) -> str:
    """The reply for an upload whose data could not be stored: 452 for a full disk."""
    reason = error.strerror or str(error)
    if error.errno in drops.NO_SPACE:
        return f"452 Insufficient storage space: {reason}; upload not stored, file discarded."
    return f"451 Upload could not be stored: {reason}; file discarded."


# ----------------------------------------------------------------------------------------
# data connections
# ----------------------------------------------------------------------------------------
class _PassiveListener(PassiveDTP):
    """``PassiveDTP`` that stays inside ``passive_ports``: when all are taken it raises
    :class:`PassivePortsBusy` (answered 425) instead of binding a kernel-chosen port."""

    def __init__(self, cmd_channel: Any, extmode: bool = False) -> None:
        self.cmd_channel = cmd_channel
        self.log = cmd_channel.log
        self.log_exception = cmd_channel.log_exception
        Acceptor.__init__(self, ioloop=cmd_channel.ioloop)
        local_ip = cmd_channel.socket.getsockname()[0]
        masquerade = cmd_channel.masquerade_address_map.get(local_ip) or cmd_channel.masquerade_address
        self.create_socket(cmd_channel.socket.family, socket.SOCK_STREAM)
        ports = list(cmd_channel.passive_ports)
        random.shuffle(ports)
        for port in ports:
            try:
                self.set_reuse_addr()
                self.bind((local_ip, port))
            except OSError:  # EADDRINUSE (another session's listener, another program), EACCES...
                continue
            break
        else:
            self.close()
            raise PassivePortsBusy(errno.EADDRINUSE, "all passive ports are in use")
        self.listen(self.backlog or cmd_channel.server.backlog)
        port = self.socket.getsockname()[1]
        if extmode:
            cmd_channel.respond(f"229 Entering extended passive mode (|||{port}|).")
        else:
            ip = masquerade or local_ip
            if ip.startswith("::ffff:"):
                ip = ip[7:]
            cmd_channel.respond(
                f"227 Entering passive mode ({ip.replace('.', ',')},{port // 256},{port % 256})."
            )
        if self.timeout:
            self.call_later(self.timeout, self.handle_timeout)


class _DataChannel(TLS_DTPHandler):
    """TLS data connection that decides itself whether an upload is complete (see module doc)."""

    max_upload_bytes: ClassVar[int | None] = None
    transfer_finished: bool

    def __init__(self, sock: socket.socket, cmd_channel: Any) -> None:
        self._settled = False
        self._outcome: str | None = None  # why an upload is refused although the peer closed cleanly
        super().__init__(sock, cmd_channel)

    # pyftpdlib pushes a listing or a download as soon as the TCP connection is accepted, and
    # asks for write events while the TLS handshake has not even started (a busy loop until
    # the client's hello arrives).  An empty one (empty folder or file) is "sent" at once and
    # the channel closed mid-handshake, or SSL_write(b"") fails with "Unexpected EOF": the
    # client sees a broken connection or 426.  Here nothing is sent before the handshake
    # completes, and empty writes never reach OpenSSL.
    def push(self, data: bytes) -> None:
        super().push(data)
        self._hold_until_handshake()

    def push_with_producer(self, producer: Any) -> None:
        super().push_with_producer(producer)
        self._hold_until_handshake()

    def _hold_until_handshake(self) -> None:
        if self._ssl_requested and not self._ssl_established and not self._closed:
            self._wanted_io_events = self.ioloop.READ
            self.modify_ioloop_events(self.ioloop.READ)

    def initiate_send(self) -> None:
        if self._ssl_requested and not self._ssl_established:
            return
        super().initiate_send()

    def send(self, data: bytes) -> int:
        if not data:
            return 0
        sent: int = super().send(data)
        return sent

    def handle_ssl_established(self) -> None:
        if self.producer_fifo:  # what push() held back
            self._wanted_io_events = self.ioloop.WRITE
            self.modify_ioloop_events(self.ioloop.WRITE)
        if self.cmd_channel.tls_session_resumption == "enforced" and not _session_reused(self.socket):
            self._resp = (
                "522 TLS session reuse required on the data connection: "
                "resume the control connection's TLS session.",
                _pyftpdlib_logger.warning,
            )
            log.warning(
                "ftps %s: data connection without TLS session reuse refused", self.cmd_channel.client_address
            )
            self.close()

    def recv(self, buffer_size: int) -> bytes:
        chunk: bytes = super().recv(buffer_size)
        limit = self.max_upload_bytes
        if chunk and self.receive and limit is not None and self.tot_bytes_received + len(chunk) > limit:
            failed = self.file_obj.failure if isinstance(self.file_obj, Upload) else None
            if failed is not None:  # draining a failed upload: say why it failed, not 552
                self._resp = (_write_failed_reply(failed), _pyftpdlib_logger.warning)
                self._outcome = f"write failed: {failed.strerror or failed}"
            else:
                self._resp = (
                    f"552 Upload exceeds the maximum size of {limit} bytes: transfer aborted, file discarded.",
                    _pyftpdlib_logger.warning,
                )
                self._outcome = "too large"
            self.close()
            raise _RetryError  # tells DTPHandler.handle_read there is nothing to write
        return chunk

    def handle_error(self) -> None:
        """An unexpected error on the data connection: discard the upload, reply, close.

        pyftpdlib's TLS mixin would close the socket bypassing :meth:`close`, so the upload
        would not be settled and the client would get no reply at all.
        """
        log.exception("ftps %s: data connection failed", self.cmd_channel.client_address)
        self._error = True  # no TLS shutdown exchange on a broken connection
        self.transfer_finished = False
        if not self._resp:
            self._resp = ("426 Internal error; transfer aborted.", _pyftpdlib_logger.warning)
        try:
            self.close()
        except Exception:
            log.exception("ftps %s: closing a failed data connection", self.cmd_channel.client_address)

    def close(self) -> None:
        if not self._settled:
            self._settled = True
            self._settle()
        if self.cmd_channel.stopping:
            self._error = True  # shutting down: close the socket without the TLS shutdown exchange
        super().close()

    def _settle(self) -> None:
        upload = self.file_obj if isinstance(self.file_obj, Upload) else None
        if upload is None:
            return
        complete = self.receive and self.transfer_finished and _close_notify_received(self.socket)
        outcome = self._outcome
        if upload.failure is not None and outcome is None:
            # A write failed (disk full): nothing was kept.  When the client ended the
            # transfer, the 452 is the reply to its STOR; after ABOR or a timeout, their
            # replies stand (a second one would put the client out of step).
            outcome = f"write failed: {upload.failure.strerror or upload.failure}"
            if self.transfer_finished:
                self.transfer_finished = False
                self._resp = (_write_failed_reply(upload.failure), _pyftpdlib_logger.warning)
        elif complete and outcome is None and not self.cmd_channel.account_stands():
            outcome = "account removed or changed during the upload"
            self.transfer_finished = False
            self._resp = ("550 Not stored: your account was removed or changed.", _pyftpdlib_logger.warning)
        elif complete and outcome is None:
            try:
                upload.publish(self.cmd_channel.owner.on_replacing)
            except OSError as error:
                self.transfer_finished = False
                self._resp = (_write_failed_reply(error), _pyftpdlib_logger.error)
                outcome = f"not stored: {error.strerror or error}"
        elif self.transfer_finished:
            # The peer ended the connection, but without TLS close_notify: pyftpdlib would
            # answer 226 and call on_file_received; this may be a truncated file.
            self.transfer_finished = False
            self._resp = (
                "426 Data connection closed without TLS close_notify: upload incomplete, file discarded.",
                _pyftpdlib_logger.warning,
            )
            outcome = "connection closed without TLS close_notify"
        if upload.state != "published":
            upload.discard()
        self.cmd_channel.upload_settled(
            upload,
            outcome or ("complete" if upload.state == "published" else "aborted"),
            self.tot_bytes_received,
            self.get_elapsed_time(),
        )


# ----------------------------------------------------------------------------------------
# control connection
# ----------------------------------------------------------------------------------------
class _ControlChannel(TLS_FTPHandler):
    """One client session.  Subclassed per server with the ``owner`` and limits filled in."""

    owner: ClassVar[FtpsServer]
    username: str
    _in_buffer: list[bytes]
    _in_buffer_len: int
    _restart_position: int
    _in_dtp_queue: tuple[Any, str] | None
    tls_session_resumption: ClassVar[SessionResumption] = "enabled"

    tls_control_required = True
    tls_data_required = True
    permit_foreign_addresses = False
    use_sendfile = False
    banner = "meterdrop FTPS drop box: explicit TLS required (AUTH TLS)."
    passive_dtp = _PassiveListener
    abstracted_fs = DropFilesystem
    proto_cmds: ClassVar[dict[str, dict[str, Any]]] = {
        name: spec for name, spec in TLS_FTPHandler.proto_cmds.items() if name not in REFUSED_COMMANDS
    }

    def __init__(self, conn: socket.socket, server: Any, ioloop: Any = None) -> None:
        self.uploads: dict[str, Upload] = {}
        self._account: User | None = None  # the account as it was at login
        self._paused = False  # a login is being checked: hold further commands
        self._held: deque[list[bytes] | None] = deque()  # None: a line that was too long
        self._overlong = False  # the line being read passed MAX_COMMAND_BYTES: drop it whole
        self.owner.handlers.add(self)
        super().__init__(conn, server, ioloop)
        self._current_type = "i"
        if self.connected:
            self.ssl_context = self.owner.new_tls_context()

    @property
    def stopping(self) -> bool:
        return self.owner.stopping

    @property
    def client_address(self) -> str:
        """The client's address as the guard and the logs know it (IPv4-mapped IPv6 unwrapped)."""
        ip: str = self.remote_ip
        return ip[7:] if ip.startswith("::ffff:") else ip

    # -- connection ---------------------------------------------------------------------
    def handle(self) -> None:
        if self.owner.guard.is_banned(self.client_address):
            log.warning("ftps %s:%s refused: address banned", self.client_address, self.remote_port)
            self.respond(_BANNED_REPLY)
            self.close_when_done()
            return
        log.info("ftps connection from %s:%s", self.client_address, self.remote_port)
        super().handle()

    def close(self) -> None:
        super().close()
        for upload in list(self.uploads.values()):
            upload.discard()
            self.upload_settled(upload, "session ended before the transfer", 0, 0.0)
        self.uploads.clear()
        self.owner.handlers.discard(self)

    def flush_account(self) -> None:
        queued = self._in_dtp_queue
        super().flush_account()
        self._current_type = "i"
        if queued is not None:
            self._drop_queued(queued[0])

    # -- command dispatch ---------------------------------------------------------------
    def collect_incoming_data(self, data: bytes) -> None:
        """Collect a command line; one longer than ``MAX_COMMAND_BYTES`` is dropped whole.

        pyftpdlib answers ``500`` as soon as its buffer passes 2048 bytes, empties it and
        goes on collecting: the rest of that line then ran as a command of its own (where it
        starts is the sender's choice, e.g. through TLS record boundaries) and one line got
        two replies, putting the client out of step.  Here the whole line is discarded and
        answered once, when its end arrives.
        """
        if self._overlong:
            return
        self._in_buffer.append(data)
        self._in_buffer_len += len(data)
        if self._in_buffer_len > MAX_COMMAND_BYTES:
            self._overlong = True
            self._in_buffer, self._in_buffer_len = [], 0

    def found_terminator(self) -> None:
        line: list[bytes] | None = self._in_buffer
        if self._overlong:
            self._overlong, line = False, None
            self._in_buffer, self._in_buffer_len = [], 0
        if self._paused:  # pipelined after PASS: answer in order, once the login is decided
            self._held.append(line)
            self._in_buffer, self._in_buffer_len = [], 0
            if len(self._held) > 16:
                self.close()
            return
        self._run_line(line)

    def _run_line(self, line: list[bytes] | None) -> None:
        if line is None:
            if self._idler is not None and not self._idler.cancelled:
                self._idler.reset()
            self.respond(f"500 Command too long: at most {MAX_COMMAND_BYTES} bytes per line.")
            return
        self._in_buffer = line
        self._in_buffer_len = sum(map(len, line))
        super().found_terminator()

    def _pause(self) -> None:
        self._paused = True
        self.del_channel()

    def _resume(self) -> None:
        """Read commands again (before replying: replies need the channel registered)."""
        self._paused = False
        self.add_channel()

    def _replay_held(self) -> None:
        while self._held and not self._paused and not self._closed and not self._closing:
            self._run_line(self._held.popleft())

    def account_stands(self) -> bool:
        """The account this session logged in with is unchanged (not removed, same password and keys)."""
        return self._account is not None and self.owner.users.get(self._account.name) == self._account

    def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
        if self.authenticated and cmd != "QUIT" and not self.account_stands():
            # `meterdrop users remove` or `passwd` revokes what the session was let in with.
            self.respond("530 Your account was removed or changed: log in again.")
            self.log_cmd(cmd, arg, 530, "account removed or changed")
            log.warning(
                "ftps %s: user %s ended: account removed or changed", self.client_address, self.username
            )
            self.close_when_done()
            return
        name = f"SITE {arg.split(' ')[0].upper()}" if cmd == "SITE" and arg else cmd
        reply = REFUSED_COMMANDS.get(name)
        if reply is not None:
            self.respond(reply)
            self.log_cmd(name, arg, int(reply[:3]), reply[4:])
            return
        try:
            super().pre_process_command(line, cmd, arg)
        except drops.Refused as refused:
            self.respond(f"550 {refused}.")
            self.log_cmd(cmd, arg, 550, str(refused))

    def process_command(self, cmd: str, *args: Any, **kwargs: Any) -> None:
        if cmd in ("USER", "PASS") and not self._ssl_established:
            self.respond("530 Plain-text login refused: send AUTH TLS first (explicit FTPS).")
            return
        if (cmd == "PASV" or (cmd == "EPSV" and args[0].upper() != "ALL")) and not self._prot:
            self.respond("521 Data connections must be protected: send PBSZ 0 and PROT P first.")
            return
        super().process_command(cmd, *args, **kwargs)

    def ftp_TYPE(self, line: str) -> None:
        kind = line.upper().replace(" ", "")
        if kind in ("I", "L8"):
            self._current_type = "i"
            self.respond("200 Type set to: Binary.")
        else:
            self.respond(f'504 Type "{line}" not supported: binary transfers only (TYPE I).')

    def ftp_PROT(self, line: str) -> None:
        if line.upper() == "C" and isinstance(self.socket, SSL.Connection):
            self.respond("534 PROT C refused: data connections must be protected (PROT P).")
            return
        super().ftp_PROT(line)

    def ftp_CWD(self, path: str) -> str | None:
        try:
            self.fs.chdir(path)
        except (OSError, FilesystemError) as error:
            self.respond(f"550 {_reason(error)}.")
            return None
        self.respond(f'250 "{self.fs.cwd}" is the current directory.')
        return path

    # -- passive mode -------------------------------------------------------------------
    def _make_epasv(self, extmode: bool = False, waited: float = 0.0) -> None:
        """Open a passive listener; when every port is taken, wait a little for one to free.

        A port is held from the 227 until the client's data connection arrives, so a burst
        of more FTPS clients than ports found none free (the soak benchmark: 6% of 5,000
        deliveries got 425 with 25 clients on the 9 default ports); export jobs that do not
        retry would lose those deliveries. The reply is deferred, not the event loop.
        """
        try:
            super()._make_epasv(extmode)
        except PassivePortsBusy:
            self._dtp_acceptor = None
            if waited < PASV_WAIT_SECONDS:
                self.ioloop.call_later(
                    PASV_RETRY_SECONDS, self._retry_epasv, extmode, waited + PASV_RETRY_SECONDS
                )
                return
            log.warning(
                "ftps %s: all passive ports busy for %.0f s, PASV refused", self.client_address, waited
            )
            self.respond("425 All passive ports are busy: try again shortly.")

    def _retry_epasv(self, extmode: bool, waited: float) -> None:
        if not self._closed:  # the client may have gone while it waited
            self._make_epasv(extmode, waited)

    # -- login --------------------------------------------------------------------------
    def ftp_PASS(self, line: str) -> None:
        if self.authenticated:
            self.respond("503 User already authenticated.")
            return
        if not self.username:
            self.respond("503 Login with USER first.")
            return
        if self.owner.guard.is_banned(self.client_address):
            self.respond(_BANNED_REPLY)
            self.close_when_done()
            return
        username, self.username = self.username, ""
        self._pause()  # like pyftpdlib's own failed-login delay: no commands until answered
        future = self.owner.verify(self.authorizer, username, line)
        future.add_done_callback(lambda done: self.owner.call_soon(self._login_checked, username, done))

    def _login_checked(self, username: str, future: Future[None]) -> None:
        if self._closed:
            return
        try:
            future.result()
        except AuthenticationFailed:
            accepted = False
        except Exception:
            log.exception("ftps %s: password check failed", self.client_address)
            accepted = False
        else:
            accepted = not self.owner.guard.is_banned(self.client_address)
        if accepted:
            self.owner.guard.succeeded(self.client_address)
            self.username = username
            self._account = self.owner.users.get(username)
            home = self.authorizer.get_home_dir(username)
            log.info("ftps %s: user %s logged in", self.client_address, username)
            self._resume()
            self.handle_auth_success(home, "", self.authorizer.get_msg_login(username))
            self._replay_held()
            return
        delay = self.owner.guard.failed(self.client_address)
        banned = self.owner.guard.is_banned(self.client_address)
        log.warning(
            "ftps %s: failed login for user %r%s",
            self.client_address,
            username,
            "; address banned" if banned else "",
        )
        self.call_later(delay, self._login_refused, username, banned)

    def _login_refused(self, username: str, banned: bool) -> None:
        if self._closed:
            return
        self._resume()
        self.attempted_logins += 1
        if banned:
            self.respond("530 Login incorrect. Too many failed logins: your address is banned for a while.")
            self.close_when_done()
        elif self.attempted_logins >= self.max_login_attempts:
            self.respond("530 Login incorrect. Disconnecting.")
            self.close_when_done()
        else:
            self.respond("530 Login incorrect.")
        self.on_login_failed(username, "")
        self._replay_held()

    # -- uploads ------------------------------------------------------------------------
    def ftp_STOR(self, file: str, mode: str = "w") -> str | None:
        if self._restart_position:
            self._restart_position = 0
            self.respond("554 Resuming uploads (REST) is not supported: send the whole file.")
            return None
        final = Path(file)
        if final.is_dir():
            self.respond("550 Is a directory.")
            return None
        try:
            upload = Upload(final, self.fs.fs2ftp(file), self.username or "-")
        except OSError as error:
            self.respond(f"550 {_reason(error)}.")
            return None
        if self._in_dtp_queue is not None:  # an earlier STOR whose data connection never came
            self._drop_queued(self._in_dtp_queue[0])
        self.uploads[upload.name] = upload
        if self.data_channel is not None:
            self.respond("125 Data connection already open. Transfer starting.")
            self.data_channel.file_obj = upload
            self.data_channel.enable_receiving(self._current_type, "STOR")
        else:
            self.respond("150 File status okay. About to open data connection.")
            self._in_dtp_queue = (upload, "STOR")
        return file

    def _drop_queued(self, file: object) -> None:
        if isinstance(file, Upload):
            file.discard()
            self.uploads.pop(file.name, None)
            self.upload_settled(file, "replaced before the transfer started", 0, 0.0)

    def upload_settled(self, upload: Upload, outcome: str, size: int, seconds: float) -> None:
        self.uploads.pop(upload.name, None)
        published = upload.state == "published"
        (log.info if published else log.warning)(
            "ftps upload user=%s path=%s bytes=%d seconds=%.3f %s",
            self.username or "-",
            upload.virtual,
            size,
            seconds,
            "complete" if published else f"incomplete ({outcome}): discarded",
        )
        if published:
            self.owner.published(upload.final)

    def log_transfer(
        self, cmd: str, filename: str, receive: bool, completed: bool, elapsed: float, bytes: int
    ) -> None:
        if not receive:  # uploads are logged by upload_settled
            log.info(
                "ftps download user=%s path=%s bytes=%d seconds=%.3f %s",
                self.username or "-",
                self.fs.fs2ftp(filename) if self.fs else filename,
                bytes,
                elapsed,
                "complete" if completed else "incomplete",
            )


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        return os.strerror(error.errno)
    return str(error) or type(error).__name__


# ----------------------------------------------------------------------------------------
# the server
# ----------------------------------------------------------------------------------------
class _Waker:
    """A socketpair in the IO loop so other threads can hand it work (and stop it)."""

    def __init__(self, ioloop: Any) -> None:
        self._ioloop = ioloop
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._fileno = self._reader.fileno()
        self._calls: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        ioloop.register(self._fileno, self, ioloop.READ)

    def call_soon(self, function: Callable[..., None], *args: Any) -> None:
        self._calls.append((function, args))
        self.wake()

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._writer.send(b"\0")

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def handle_read_event(self) -> None:
        with contextlib.suppress(OSError):
            while self._reader.recv(4096):
                pass
        while self._calls:
            function, args = self._calls.popleft()
            try:
                function(*args)
            except Exception:
                log.exception("ftps: callback %r failed", function)

    def handle_write_event(self) -> None:
        pass

    def handle_error(self) -> None:
        log.exception("ftps: wake-up channel failed")

    def handle_close(self) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(KeyError, OSError):
            self._ioloop.unregister(self._fileno)
        self._reader.close()
        self._writer.close()


def _pasv_address(public_host: str) -> str:
    """The IPv4 address to announce in 227 replies for ``public_host`` (address or name)."""
    try:
        address = ipaddress.ip_address(public_host)
    except ValueError:
        try:
            return str(socket.getaddrinfo(public_host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
        except OSError as error:
            raise ValueError(
                f"public host {public_host!r} does not resolve to an IPv4 address: {error}"
            ) from None
    if address.version != 4:
        raise ValueError(f"public host {public_host!r}: PASV replies can only announce an IPv4 address")
    return str(address)


class FtpsServer:
    """Explicit-FTPS drop box on ``host:port``, served from a background thread."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        passive_ports: range,
        users: UserStore,
        guard: Guard,
        certs_dir: Path,
        public_host: str | None = None,
        max_upload_bytes: int | None = None,
        max_connections_per_ip: int = 10,
        idle_timeout: int = 300,
        on_published: Callable[[Path], None] | None = None,
        on_replacing: drops.Keep | None = None,
        tls_session_resumption: SessionResumption = "enabled",
    ) -> None:
        if not passive_ports or passive_ports[0] < 1 or passive_ports[-1] > 65535:
            raise ValueError(f"passive ports must be a non-empty range within 1-65535, not {passive_ports!r}")
        if tls_session_resumption not in ("disabled", "enabled", "enforced"):
            raise ValueError(
                f"tls_session_resumption must be disabled, enabled or enforced, not {tls_session_resumption!r}"
            )
        if tls_session_resumption == "enforced" and _SSL_session_reused is None:
            raise ValueError(
                "this pyOpenSSL build cannot report TLS session reuse: 'enforced' is unavailable"
            )
        self.users = users
        self.guard = guard
        self.on_published = on_published
        self.on_replacing = on_replacing  # called before an upload or RNTO replaces a file
        self.tls_session_resumption: SessionResumption = tls_session_resumption
        self.stopping = False
        self.handlers: set[_ControlChannel] = set()
        pair = ensure_certificate(certs_dir, [public_host] if public_host else [])
        self.certificate = pair
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="meterdrop-ftps-auth")
        self._ioloop = IOLoop()
        self._waker = _Waker(self._ioloop)
        self._thread: threading.Thread | None = None
        self._stop_lock = threading.Lock()
        self._closed = False

        data_channel = type(
            "MeterdropFtpsDataChannel",
            (_DataChannel,),
            {"timeout": idle_timeout, "max_upload_bytes": max_upload_bytes},
        )
        handler = type(
            "MeterdropFtpsHandler",
            (_ControlChannel,),
            {
                "owner": self,
                "authorizer": UserStoreAuthorizer(users),
                "dtp_handler": data_channel,
                "passive_ports": passive_ports,
                "masquerade_address": _pasv_address(public_host) if public_host else None,
                "masquerade_address_map": {},
                "timeout": idle_timeout,
                "tls_session_resumption": tls_session_resumption,
                "ssl_context": self.new_tls_context(),
            },
        )
        server_class = type("MeterdropFtpServer", (FTPServer,), {"max_cons_per_ip": max_connections_per_ip})
        try:
            self._server = server_class((host, port), handler, ioloop=self._ioloop)
        except BaseException:
            self._waker.close()
            self._ioloop.close()
            self._executor.shutdown(wait=False)
            raise
        bound = self._server.address
        self._address = (str(bound[0]), int(bound[1]))

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the real port when 0 was asked for."""
        return self._address

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("FTPS server already started")
        self._thread = threading.Thread(target=self._serve, name="meterdrop-ftps", daemon=True)
        self._thread.start()
        host, port = self.address
        log.info("ftps listening on %s:%d", host, port)

    def stop(self) -> None:
        with self._stop_lock:
            self.stopping = True
            thread = self._thread
        if thread is None:
            self._shutdown()
            return
        self._waker.wake()
        thread.join(timeout=10)
        if thread.is_alive():
            log.error("ftps: server thread did not stop within 10 s")

    # -- used by the handlers (IO loop thread unless noted) ------------------------------
    def new_tls_context(self) -> SSL.Context:
        """A fresh context per control connection: its session cache and ticket keys are its own."""
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        context.set_cipher_list(TLS12_CIPHERS)
        context.use_certificate(self.certificate.chain[0])
        for extra in self.certificate.chain[1:]:
            context.add_extra_chain_cert(extra)
        context.use_privatekey(self.certificate.key)
        context.check_privatekey()
        if self.tls_session_resumption == "disabled":
            context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            context.set_options(SSL.OP_NO_TICKET)
        else:
            context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
            context.set_session_id(b"meterdrop-ftps")
        return context

    def verify(self, authorizer: UserStoreAuthorizer, username: str, password: str) -> Future[None]:
        """Check a password on the worker pool (argon2 takes ~0.1 s; the IO loop must not wait)."""
        return self._executor.submit(authorizer.validate_authentication, username, password, None)

    def call_soon(self, function: Callable[..., None], *args: Any) -> None:
        """Run ``function(*args)`` on the IO loop thread (callable from any thread)."""
        if not self.stopping:
            self._waker.call_soon(function, *args)

    def published(self, final: Path) -> None:
        if self.on_published is None:
            return
        try:
            self.on_published(final)
        except Exception:
            log.exception("ftps: on_published(%s) failed", final)

    # -- the loop ---------------------------------------------------------------------------
    def _serve(self) -> None:
        ioloop = self._ioloop
        try:
            while not self.stopping:
                timeout = ioloop.sched.poll()
                if self.stopping:
                    break
                ioloop.poll(timeout)
        except Exception:
            log.exception("ftps: server loop failed")
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stopping = True
        try:
            self._server.close_all()  # every channel registered in the loop, then the scheduler
        finally:
            for handler in list(self.handlers):  # sessions paused while a login is checked
                with contextlib.suppress(Exception):
                    handler.close()
            self._waker.close()
            self._executor.shutdown(wait=False, cancel_futures=True)
