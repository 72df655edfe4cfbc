"""kill -9 `meterdrop serve` at random moments under a stream of uploads, then check nothing was
lost, nothing was ingested twice and nothing half-uploaded got in.

    ./run python bench/chaos_kill.py                      # 200 kills, at most 30 minutes
    ./run python bench/chaos_kill.py --kills 20 --minutes 3 --json out.json

What it does: a temporary data dir, a user made with `meterdrop users add`, the real
`meterdrop serve` on loopback (random free ports); clients (paramiko SFTP and ftplib FTPS)
upload small Panoramic Measurements CSVs whose reading keys overlap, so newest-wins
decides the table, and cut some uploads off mid-transfer on purpose.  The server is
killed with SIGKILL a random 0.05-2 s after the clients have logged in to it (one kill in
ten: after its start, to hit start-up and the rescan), restarted, killed again, until
``--kills`` kills or ``--minutes`` have passed.  Then a last start, a wait (polling the
ledger) until every published file is in it, a clean SIGTERM, and the verdict:

* every upload the client saw complete (FTPS ``226``; SFTP close answered and the file
  then found under its final name) is in the ledger exactly once, ingested, with the
  content the client sent (sha256) and its number of rows;
* no upload the client never finished (cut on purpose, or cut by a kill before the client
  sent its end: SFTP close, FTPS TLS close_notify) and none the server refused (``426``...)
  is in the ledger or the drop folder under its final name;
* "unsure" uploads (the client sent its end, then the server died before answering) may
  go either way; they are counted;
* `meterdrop check` passes; every ledger entry's delivery time is its file's mtime;
* ``panoramic_measurements`` equals what applying the ingested deliveries in delivery
  order (mtime, path, line; last wins) gives, computed here with polars from what the
  clients sent, not from what meterdrop parsed.

Exit status 0 when all of that holds.  tests/test_faults_kill.py runs a short version.
"""

from __future__ import annotations

import argparse
import contextlib
import ftplib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paramiko  # noqa: E402
import polars as pl  # noqa: E402

from processor.store import open_store  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from bench_servers import free_port_range  # noqa: E402

USER = "chaos"
PASSWORD = "chaos-monkey passphrase"
HEADER = (
    "device_id, device_name, measurement_time(UTC), resolution(minutes), site_id, site_name, "
    "current(A), voltage(V), power(W), power_factor, energy(Wh)"
)
DEVICES = [f"d{i:02d}" for i in range(20)]
START = datetime(2024, 3, 1, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SLOTS = [START + timedelta(minutes=30 * i) for i in range(48)]  # 20 x 48 = 960 reading keys in all

Outcome = Literal["completed", "interrupted", "cut", "refused", "unsure"]
# completed   the client saw it complete (FTPS 226; SFTP close answered and the file found)
# interrupted cut off on purpose before the client's end-of-upload (SFTP close / TLS close_notify)
# cut         cut off by a kill before the client sent its end-of-upload
# refused     the server answered that it was not complete (426, 451, 552...)
# unsure      the client sent its end, then lost the server before hearing back


@dataclass(frozen=True)
class ChaosConfig:
    kills: int = 200
    minutes: float = 30.0
    sftp_clients: int = 2
    ftps_clients: int = 2
    min_delay: float = 0.05  # a server lives this long at least before its kill ...
    max_delay: float = 2.0  # ... and at most this long
    interrupt_share: float = 0.12  # uploads cut off on purpose
    early_share: float = 0.1  # kills timed from the server's start, not from the clients' logins
    seed: int = 0
    drain_timeout: float = 600.0
    workdir: Path | None = None  # kept afterwards when given; else a temporary folder, removed


@dataclass
class Upload:
    """One upload attempt: what was sent, and what the client saw."""

    client: str
    protocol: str
    name: str
    data: bytes
    rows: list[tuple[str, datetime, float, float]]  # device, time, power, energy, in line order
    deliberate_cut: bool
    outcome: Outcome | None = None
    detail: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class ChaosResult:
    kills: int = 0
    kills_db_open: int = 0  # the server had the database file open at the kill (mid-batch)
    kills_mid_upload: int = 0  # a partial upload existed at the kill
    starts: int = 0
    waits_for_logins_timed_out: int = 0
    uploads: dict[str, int] = field(default_factory=dict)
    by_protocol: dict[str, dict[str, int]] = field(default_factory=dict)  # sftp/ftps -> outcome -> count
    unsure_ingested: int = 0
    files_ingested: int = 0
    files_duplicate: int = 0
    files_rejected: int = 0
    table_rows: int = 0
    partials_swept: int = 0
    server_errors: int = 0
    check: str = ""
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    drain_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


# -- the server -------------------------------------------------------------------------------------


class Endpoint:
    """Where the server listens now; clients wait here while it is down."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.generation = 0
        self.ports: tuple[int, int] | None = None
        self.closed = False
        self._logged_in: Counter[int] = Counter()  # generation -> clients logged in to that server

    def logged_in(self, generation: int) -> None:
        with self._cond:
            self._logged_in[generation] += 1
            self._cond.notify_all()

    def wait_for_logins(self, count: int, timeout: float) -> bool:
        """Until ``count`` clients are logged in to the current server (or ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._logged_in[self.generation] < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def up(self, sftp: int, ftps: int) -> None:
        with self._cond:
            self.generation += 1
            self.ports = (sftp, ftps)
            self._cond.notify_all()

    def down(self) -> None:
        with self._cond:
            self.ports = None

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait(self, newer_than: int, stop: threading.Event) -> tuple[int, tuple[int, int]] | None:
        """The (generation, ports) of a server newer than ``newer_than`` once it is up; None when stopping."""
        with self._cond:
            while not (self.closed or stop.is_set()) and (
                self.ports is None or self.generation <= newer_than
            ):
                self._cond.wait(0.2)
            if self.closed or stop.is_set() or self.ports is None:
                return None
            return self.generation, self.ports


class Server:
    """One `meterdrop serve` process; its log is appended to ``log_path``."""

    def __init__(self, data: Path, passive: range, log_path: Path) -> None:
        self.log_path = log_path
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meterdrop", "serve", "--data-dir", str(data), "--host", "127.0.0.1",
             "--sftp-port", "0", "--ftps-port", "0", "--passive-ports", f"{passive.start}-{passive.stop - 1}",
             "--certs-dir", str(data / "certs")],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
        )  # fmt: skip
        self.ports: tuple[int, int] | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(120) or self.ports is None:
            self.process.kill()
            raise RuntimeError(f"meterdrop serve did not start; see {log_path}")

    def _read(self) -> None:
        assert self.process.stderr is not None
        with self.log_path.open("a") as log:
            log.write(f"---- start pid {self.process.pid}\n")
            for line in self.process.stderr:
                log.write(line)
                match = re.search(r"SFTP on [\d.]+:(\d+), FTPS on [\d.]+:(\d+)", line)
                if match:
                    self.ports = (int(match.group(1)), int(match.group(2)))
                    self._ready.set()
            self._ready.set()

    def holds(self, path: Path) -> bool:
        """Whether the process has ``path`` open now (read from /proc: the moment of the kill)."""
        folder = Path(f"/proc/{self.process.pid}/fd")
        with contextlib.suppress(OSError):
            for fd in os.listdir(folder):
                with contextlib.suppress(OSError):
                    if os.readlink(folder / fd) == str(path):
                        return True
        return False

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._reader.join(30)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=120)
        self._reader.join(30)
        return code


# -- what the clients send ---------------------------------------------------------------------------
class Deliveries:
    """Makes unique uploads whose reading keys overlap across files (and sometimes within one)."""

    def __init__(self, seed: int) -> None:
        self._lock = threading.Lock()
        self._next = 0
        self._seed = seed

    def make(self, client: str, protocol: str, interrupt_share: float) -> Upload:
        with self._lock:
            self._next += 1
            number = self._next
        rng = random.Random(self._seed * 1_000_003 + number)
        keys = [(d, t) for d in DEVICES for t in SLOTS]
        count = len(keys) if rng.random() < 0.05 else rng.randint(1, 60)
        chosen = rng.sample(keys, count)
        if count > 1 and rng.random() < 0.3:  # the same reading twice in one file: the later line wins
            chosen += rng.sample(chosen, rng.randint(1, min(5, count)))
        rows = []
        lines = [HEADER]
        for line, (device, slot) in enumerate(chosen, 2):
            power = float(rng.randint(0, 50_000))
            energy = float(number * 10_000 + line)  # unique per upload and line: no two files are alike
            rows.append((device, slot, power, energy))
            lines.append(f"{device},Dev {device},{slot:%Y-%m-%dT%H:%M:%SZ},30,S1,Site,1.5,230,{power:.0f},0.9,"
                         f"{energy:.0f}")  # fmt: skip
        data = ("\n".join(lines) + "\n").encode()
        return Upload(client, protocol, f"{client}-{number:06d}.csv", data, rows,
                      rng.random() < interrupt_share)  # fmt: skip


class Client(threading.Thread):
    """Uploads until told to stop, reconnecting to whichever server is up."""

    protocol = ""

    def __init__(self, name: str, endpoint: Endpoint, deliveries: Deliveries, config: ChaosConfig,
                 certs: Path, stop: threading.Event, record: Callable[[Upload], None]) -> None:  # fmt: skip
        super().__init__(name=name, daemon=True)
        self.endpoint = endpoint
        self.deliveries = deliveries
        self.config = config
        self.certs = certs
        self.stop_event = stop
        self.record = record
        self.rng = random.Random(f"{config.seed}-{name}")
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            unreachable = 0  # the newest server generation this client could not reach
            while not self.stop_event.is_set():
                if not self.connected():
                    found = self.endpoint.wait(unreachable, self.stop_event)
                    if found is None:
                        return
                    generation, ports = found
                    try:
                        self.connect(ports)
                    except (OSError, EOFError, ftplib.Error, paramiko.SSHException):
                        self.disconnect()
                        unreachable = generation  # that server is gone already: wait for the next one
                        continue
                    self.endpoint.logged_in(generation)
                upload = self.deliveries.make(self.name, self.protocol, self.config.interrupt_share)
                self.send(upload)
                self.record(upload)
                if upload.outcome != "completed":
                    self.disconnect()
                self.stop_event.wait(self.rng.uniform(0, 0.15))  # pacing, so uploads and ingests interleave
        except BaseException as error:  # a bug in the harness must fail the run, not hang it
            self.failure = error
        finally:
            self.disconnect()

    def connected(self) -> bool:
        raise NotImplementedError

    def connect(self, ports: tuple[int, int]) -> None:
        raise NotImplementedError

    def disconnect(self) -> None:
        raise NotImplementedError

    def send(self, upload: Upload) -> None:
        raise NotImplementedError


class SftpClient(Client):
    protocol = "sftp"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sock: socket.socket | None = None
        self.transport: paramiko.Transport | None = None
        self.sftp: paramiko.SFTPClient | None = None

    def connected(self) -> bool:
        return self.sftp is not None

    def connect(self, ports: tuple[int, int]) -> None:
        self.sock = socket.create_connection(("127.0.0.1", ports[0]), timeout=30)
        self.transport = paramiko.Transport(self.sock)
        self.transport.start_client(timeout=30)
        self.transport.auth_password(USER, PASSWORD)
        self.sftp = paramiko.SFTPClient.from_transport(self.transport)
        assert self.sftp is not None
        self.sftp.get_channel().settimeout(30)

    def disconnect(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.close()
        self.sock = self.transport = self.sftp = None

    def send(self, upload: Upload) -> None:
        sftp = self.sftp
        assert sftp is not None
        cut_at = len(upload.data) // 2
        try:
            remote = sftp.open(upload.name, "wb")
            remote.set_pipelined(False)  # each write waits for the server's answer
            remote.write(upload.data[:cut_at] if upload.deliberate_cut else upload.data)
            remote.flush()
        except (OSError, EOFError, paramiko.SSHException) as error:
            # End the connection while `remote` is alive: collected first, paramiko would send
            # an SFTP close for it, which publishes a partial file as complete.
            self.disconnect()
            upload.outcome, upload.detail = "cut", repr(error)
            return
        if upload.deliberate_cut:
            # The connection simply ends: no SFTP close, as when a client crashes.
            upload.outcome = "interrupted"
            self.disconnect()
            return
        try:
            remote.close()  # paramiko ignores a lost connection here: the stat below is the proof
            size = sftp.stat(upload.name).st_size
        except FileNotFoundError as error:
            upload.outcome, upload.detail = "refused", repr(error)
            return
        except (OSError, EOFError, paramiko.SSHException) as error:
            self.disconnect()
            upload.outcome, upload.detail = "unsure", repr(error)
            return
        if size == len(upload.data):
            upload.outcome = "completed"
        else:
            upload.outcome, upload.detail = "refused", f"published with {size} bytes of {len(upload.data)}"


class FtpsClient(Client):
    protocol = "ftps"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ftp: ftplib.FTP_TLS | None = None

    def connected(self) -> bool:
        return self.ftp is not None

    def connect(self, ports: tuple[int, int]) -> None:
        context = ssl.create_default_context(cafile=str(self.certs / "ftps.crt"))
        self.ftp = ftplib.FTP_TLS(context=context, timeout=30)
        self.ftp.connect("127.0.0.1", ports[1])
        self.ftp.login(USER, PASSWORD)
        self.ftp.prot_p()

    def disconnect(self) -> None:
        if self.ftp is not None:
            with contextlib.suppress(Exception):
                self.ftp.close()
        self.ftp = None

    def _data_connection(self, upload: Upload) -> socket.socket | None:
        ftp = self.ftp
        assert ftp is not None
        for _ in range(100):
            try:
                return ftp.transfercmd(f"STOR {upload.name}")
            except ftplib.error_temp as error:
                if not str(error).startswith("425"):  # 425: every passive port busy, try again
                    raise
            self.stop_event.wait(0.05)
        raise ftplib.error_temp("425 passive ports busy for 5 s")

    def send(self, upload: Upload) -> None:
        ftp = self.ftp
        assert ftp is not None
        try:
            conn = self._data_connection(upload)
            assert conn is not None
            if upload.deliberate_cut:
                conn.sendall(upload.data[: len(upload.data) // 2])
        except (OSError, EOFError, ftplib.Error) as error:
            upload.outcome, upload.detail = "cut", repr(error)
            return
        if upload.deliberate_cut:
            # TCP ends without TLS close_notify, as when a client crashes: must be discarded (426).
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
            upload.outcome = "interrupted"
            try:
                reply = ftp.voidresp()
            except ftplib.error_temp as error:
                reply = str(error)
            except (OSError, EOFError, ftplib.Error) as error:
                reply = repr(error)
            upload.detail = reply
            return
        try:
            conn.sendall(upload.data)
        except OSError as error:
            upload.outcome, upload.detail = "cut", repr(error)
            conn.close()
            return
        try:
            assert isinstance(conn, ssl.SSLSocket)
            conn.unwrap()  # TLS close_notify: "that was everything"
            conn.close()
            reply = ftp.voidresp()
        except (ftplib.error_temp, ftplib.error_perm) as error:
            upload.outcome, upload.detail = "refused", str(error)
            return
        except (OSError, EOFError, ftplib.Error) as error:
            upload.outcome, upload.detail = "unsure", repr(error)
            return
        upload.outcome, upload.detail = (
            ("completed", reply) if reply.startswith("226") else ("refused", reply)
        )


# -- the run -----------------------------------------------------------------------------------------
def run(config: ChaosConfig, say: Callable[[str], None] = print) -> ChaosResult:
    """The whole experiment; ``result.problems`` lists every broken promise."""
    started = time.monotonic()
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # it reports every reset connection on stderr
    result = ChaosResult()
    rng = random.Random(config.seed)
    work = config.workdir or Path(tempfile.mkdtemp(prefix="meterdrop-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()  # absolute: the server's open files are compared by path
    data = work / "data"
    log_path = work / "serve.log"
    added = subprocess.run([sys.executable, "-m", "meterdrop", "users", "add", USER, "--password-stdin",
                            "--data-dir", str(data)], input=PASSWORD + "\n", capture_output=True, text=True,
                           cwd=ROOT, check=False)  # fmt: skip
    if added.returncode != 0:
        raise RuntimeError(f"users add failed: {added.stderr}")
    passive = free_port_range(8)
    endpoint = Endpoint()
    uploads: list[Upload] = []
    lock = threading.Lock()

    def record(upload: Upload) -> None:
        with lock:
            uploads.append(upload)

    stop = threading.Event()
    deliveries = Deliveries(config.seed)
    first = Server(data, passive, log_path)
    server: Server | None = first
    result.starts += 1
    assert first.ports is not None
    endpoint.up(*first.ports)
    clients: list[Client] = [
        *(SftpClient(f"s{i}", endpoint, deliveries, config, data / "certs", stop, record)
          for i in range(config.sftp_clients)),
        *(FtpsClient(f"f{i}", endpoint, deliveries, config, data / "certs", stop, record)
          for i in range(config.ftps_clients)),
    ]  # fmt: skip
    for client in clients:
        client.start()
    deadline = started + config.minutes * 60
    drop = data / "drop"
    db = data / "meterdrop.duckdb"
    try:
        while result.kills < config.kills and time.monotonic() < deadline:
            assert server is not None
            # Mostly, the random life starts once the clients are back (under load a restart and
            # logins can take seconds, and a server killed before anyone reached it tests little);
            # one time in ten it starts at once, to kill during start-up and the rescan.
            if rng.random() >= config.early_share:
                result.waits_for_logins_timed_out += not endpoint.wait_for_logins(len(clients), 30.0)
            # Chaos, not synchronisation: the server lives a random while, then dies at once.
            time.sleep(rng.uniform(config.min_delay, config.max_delay))
            result.kills_db_open += server.holds(db)
            result.kills_mid_upload += any(drop.rglob(".*.part-*"))
            server.kill()
            endpoint.down()
            result.kills += 1
            if result.kills % 10 == 0:
                with lock:
                    done = Counter(u.outcome for u in uploads)
                say(
                    f"  {result.kills} kills, {time.monotonic() - started:.0f} s, uploads so far: {dict(done)}"
                )
            server = Server(data, passive, log_path)
            result.starts += 1
            assert server.ports is not None
            endpoint.up(*server.ports)
        stop.set()
        for client in clients:
            client.join(120)
            if client.failure is not None:
                result.problems.append(f"client {client.name} crashed: {client.failure!r}")
            elif client.is_alive():
                result.problems.append(f"client {client.name} did not stop")
        endpoint.close()
        drained = time.monotonic()
        _wait_for_drain(data, config.drain_timeout, result)
        result.drain_seconds = time.monotonic() - drained
        assert server is not None
        code = server.terminate()
        server = None
        if code != 0:
            result.problems.append(f"the last server exited {code} on SIGTERM")
        _verify(data, uploads, result)
    finally:
        stop.set()
        endpoint.close()
        if server is not None:
            server.kill()
    log = log_path.read_text(errors="replace")
    result.partials_swept = sum(int(n) for n in re.findall(r"removed (\d+) unfinished upload", log))
    result.server_errors = len(re.findall(r" ERROR |Traceback", log))
    if result.server_errors:
        result.problems.append(f"{result.server_errors} error(s) in the server log ({log_path})")
    result.seconds = time.monotonic() - started
    if config.workdir is None and result.ok:
        shutil.rmtree(work, ignore_errors=True)
    elif not result.ok:
        say(f"kept for inspection: {work}")
    return result


def _published(data: Path) -> set[str]:
    """Final names in the drop folder: what the ledger must hold once the backlog is done."""
    drop = data / "drop"
    return {str(p) for p in drop.rglob("*") if p.is_file() and not p.name.startswith(".")}


def _wait_for_drain(data: Path, timeout: float, result: ChaosResult) -> None:
    """Poll the ledger until every published file is in it (the backlog after the last start)."""
    db = data / "meterdrop.duckdb"
    deadline = time.monotonic() + timeout
    while True:
        missing = _published(data)
        if db.exists():
            with open_store(db, read_only=True, wait=60) as store:
                missing -= {p for (p,) in store.con.execute("SELECT path FROM files").fetchall()}
        if not missing:
            return
        if time.monotonic() > deadline:
            result.problems.append(
                f"{len(missing)} published file(s) not in the ledger after {timeout:.0f} s"
            )
            return
        time.sleep(0.5)


def _verify(data: Path, uploads: list[Upload], result: ChaosResult) -> None:
    problems = result.problems
    counts = Counter(u.outcome for u in uploads)
    result.uploads = {
        name: counts.get(name, 0) for name in ("completed", "interrupted", "cut", "refused", "unsure")
    }
    for upload in uploads:
        outcomes = result.by_protocol.setdefault(upload.protocol, {})
        outcomes[upload.outcome or "none"] = outcomes.get(upload.outcome or "none", 0) + 1
    home = data / "drop" / USER
    with open_store(data / "meterdrop.duckdb", read_only=True, wait=60) as store:
        con = store.con
        entries = con.execute("SELECT path, status, sha256, rows, delivered_at, error FROM files").fetchall()
        table = con.execute(
            "SELECT device_id, measurement_time, power_w, energy_wh, delivered_at, source_path, source_line "
            "FROM panoramic_measurements"
        ).pl()
    by_path: dict[str, list[tuple[Any, ...]]] = {}
    for entry in entries:
        by_path.setdefault(entry[0], []).append(entry)
    statuses = Counter(e[1] for e in entries)
    result.files_ingested = statuses.get("ingested", 0)
    result.files_duplicate = statuses.get("duplicate", 0)
    result.files_rejected = statuses.get("rejected", 0)
    for entry in entries:
        if entry[1] == "rejected":
            problems.append(f"rejected {entry[0]}: {entry[5]} (a cut-off upload published?)")
    known = {str(home / u.name) for u in uploads}
    strangers = sorted(set(by_path) - known)
    if strangers:
        problems.append(f"{len(strangers)} ledger entries for files no client sent: {strangers[:3]}")

    delivered: list[tuple[Upload, datetime]] = []
    for upload in uploads:
        path = str(home / upload.name)
        found = by_path.get(path, [])
        if upload.outcome == "completed" or (upload.outcome == "unsure" and found):
            if len(found) != 1:
                problems.append(f"{upload.outcome} upload {upload.name} is in the ledger {len(found)} times")
                continue
            _, status, sha, rows, delivered_at, _ = found[0]
            if status not in ("ingested", "duplicate") or sha != upload.sha256 or rows != len(upload.rows):
                problems.append(f"{upload.name}: ledger says {status}, {rows} rows, sha {sha[:12]}; "
                                f"sent {len(upload.rows)} rows, sha {upload.sha256[:12]}")  # fmt: skip
                continue
            mtime = (home / upload.name).stat().st_mtime_ns // 1000
            if (delivered_at - EPOCH) // timedelta(microseconds=1) != mtime:
                problems.append(f"{upload.name}: delivered_at {delivered_at} is not the file's mtime")
            result.unsure_ingested += upload.outcome == "unsure"
            delivered.append((upload, delivered_at))
        elif upload.outcome in ("interrupted", "cut", "refused"):
            if found or (home / upload.name).exists():
                problems.append(f"{upload.outcome} upload {upload.name} was published ({upload.detail})")
            if upload.deliberate_cut and upload.detail.startswith("226"):
                problems.append(f"the server answered 226 to the cut-off upload {upload.name}")
    _compare_table(delivered, table, home, result)
    checked = subprocess.run([sys.executable, "-m", "meterdrop", "check", "--data-dir", str(data)],
                             capture_output=True, text=True, cwd=ROOT, check=False)  # fmt: skip
    result.check = (checked.stdout.strip() or checked.stderr.strip()).replace("\n", " | ")
    if checked.returncode != 0:
        problems.append(f"meterdrop check failed: {result.check}")
    leftovers = sorted(str(p) for p in (data / "drop").rglob(".*.part-*"))
    if leftovers:
        problems.append(f"{len(leftovers)} partial upload(s) left after a clean stop: {leftovers[:3]}")


def _compare_table(delivered: list[tuple[Upload, datetime]], table: pl.DataFrame, home: Path,
                   result: ChaosResult) -> None:  # fmt: skip
    """The table must be the deliveries applied in (delivered_at, path, line) order, last one winning."""
    result.table_rows = table.height
    sent = pl.DataFrame(
        [
            (device, slot, power, energy, at, str(home / upload.name), line)
            for upload, at in delivered
            for line, (device, slot, power, energy) in enumerate(upload.rows, 2)
        ],
        schema={"device_id": pl.String, "measurement_time": pl.Datetime("us", "UTC"), "power_w": pl.Float64,
                "energy_wh": pl.Float64, "delivered_at": pl.Datetime("us", "UTC"), "source_path": pl.String,
                "source_line": pl.Int64},
        orient="row",
    )  # fmt: skip
    expected = (
        sent.sort("delivered_at", "source_path", "source_line")
        .unique(subset=["device_id", "measurement_time"], keep="last", maintain_order=True)
        .sort("device_id", "measurement_time")
    )
    actual = table.with_columns(
        pl.col("measurement_time").cast(pl.Datetime("us", "UTC")),
        pl.col("delivered_at").cast(pl.Datetime("us", "UTC")),
    ).sort("device_id", "measurement_time")
    if not actual.equals(expected):
        diff = actual.join(expected, on=["device_id", "measurement_time"], how="full", suffix="_expected")
        wrong = diff.filter(pl.col("energy_wh").ne_missing(pl.col("energy_wh_expected")))
        result.problems.append(
            f"panoramic_measurements differs from the deliveries applied in order: {actual.height} rows, "
            f"expected {expected.height}; {wrong.height} differ, e.g. {wrong.head(3).to_dicts()}"
        )


def report(config: ChaosConfig, result: ChaosResult) -> str:
    u = result.uploads
    return "\n".join([
        f"chaos_kill: {result.kills} kills (asked {config.kills}, delay {config.min_delay}-{config.max_delay} s), "
        f"{result.starts} starts; at the kill the server had the database open {result.kills_db_open} times, "
        f"an upload was in flight {result.kills_mid_upload} times; clients slow to log in "
        f"{result.waits_for_logins_timed_out} times",
        f"uploads: {u.get('completed', 0)} completed, {u.get('interrupted', 0)} interrupted on purpose, "
        f"{u.get('cut', 0)} cut by a kill, {u.get('refused', 0)} refused by the server, {u.get('unsure', 0)} "
        f"unsure ({result.unsure_ingested} of them ingested); by protocol {result.by_protocol}",
        f"ledger: {result.files_ingested} ingested, {result.files_duplicate} duplicate, {result.files_rejected} "
        f"rejected; panoramic_measurements {result.table_rows} rows; {result.partials_swept} partial upload(s) "
        f"swept at restarts",
        f"meterdrop check: {result.check}",
        f"wall time {result.seconds:.0f} s (final drain {result.drain_seconds:.1f} s)",
        "PASS" if result.ok else "FAIL:\n  - " + "\n  - ".join(result.problems),
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=200, help="kill -9 this many times (default 200)")
    parser.add_argument(
        "--minutes", type=float, default=30.0, help="stop killing after this long (default 30)"
    )
    parser.add_argument("--sftp-clients", type=int, default=2)
    parser.add_argument("--ftps-clients", type=int, default=2)
    parser.add_argument(
        "--min-delay", type=float, default=0.05, help="shortest server life, s (default 0.05)"
    )
    parser.add_argument("--max-delay", type=float, default=2.0, help="longest server life, s (default 2)")
    parser.add_argument(
        "--seed", type=int, default=None, help="random seed (default: from the clock, printed)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data dir and log here")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int(time.time())
    config = ChaosConfig(kills=args.kills, minutes=args.minutes, sftp_clients=args.sftp_clients,
                         ftps_clients=args.ftps_clients, min_delay=args.min_delay, max_delay=args.max_delay,
                         seed=seed, workdir=args.workdir)  # fmt: skip
    print(f"chaos_kill: seed {seed}, up to {config.kills} kills in {config.minutes:g} min", flush=True)
    result = run(config, say=lambda text: print(text, flush=True))
    print(report(config, result), flush=True)
    if args.json is not None:
        figures = {**asdict(result), "ok": result.ok, "seed": seed}
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
