"""Soak: many small deliveries over SFTP and FTPS from concurrent clients into a real `meterdrop serve`.

Standalone and print-only: it measures and reports (tests/test_load.py runs a short version
and asserts what must hold whatever the machine: exactly once, newest wins, fds back, RSS bounded).

    ./run python bench/bench_soak.py                                   # 10,000 deliveries, 50 clients, 16 KB
    ./run python bench/bench_soak.py --checkpoints 4                   # RSS after each quarter, drained
    ./run python bench/bench_soak.py --deliveries 1000 --clients 10    # a quick look

Why: the concurrent case of bench_servers.py runs for seconds; a leak of one descriptor or
a few KiB per connection or per delivery only shows over thousands. Issue #5 asks for
10,000 deliveries from 50 clients in under 15 minutes, with the server's RSS at the end
within 20% of the start and its open descriptors back where they started.

How:
- `meterdrop serve` as a subprocess on 127.0.0.1 with free ports (bench_servers.Meterdrop),
  all limits at their defaults, `--passive-ports` 9 ports as deployed (8192-8200).
- Half the clients SFTP (asyncssh, one worker process, public-key login), half FTPS
  (ftplib.FTP_TLS threads in another process, password login). Every FTPS client connects
  from its own source address 127.1.0.N, so the server keeps its default limit of 10 control
  connections per address (no --max-connections-per-ip); SFTP clients use 127.0.0.1.
- Each client reconnects every --per-session deliveries (20 by default): connection set-up
  and tear-down are soaked too, not only uploads on a long-lived session.
- Deliveries are Panoramic Measurements CSVs of about --file-kb KB, each a unique path
  (``<user>/d000123.csv``) and unique content (energy = the delivery's number), covering a
  window of 10 devices x N quarter-hours out of 100 devices x 96 quarter-hours: every reading
  key is delivered many times, so newest-wins decides which delivery's value stays.
- Two phases. Warm-up: the first --warmup deliveries (100), spread over all clients; then
  the backlog drains, every client connection closes and the server's CPU falls idle:
  the "start" sample (RSS with children, open fds). Then the rest; the same drain and
  waits: the "end" sample. Both samples are taken in the same state (no client connected,
  no backlog, database closed), so a difference is what the run left behind.
  --checkpoints N splits the rest into N parts, each drained and sampled the same way: a
  leak grows part after part, an allocator's high-water mark levels off.
- The ledger is polled read-only every --poll seconds as a user's query would, which gives
  "upload done -> visible to a reader"; the ledger's own ``ingested_at`` gives "upload
  done -> ingested_at". At the end: every delivery in the ledger exactly once as
  ingested with its rows, each reading key holding the newest delivery's value,
  and `meterdrop check` (ledger and tables agree, no duplicate key).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ftplib
import io
import json
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from bench_servers import (
    EPOCH,
    HEADER,
    LedgerReader,
    Meterdrop,
    MiB,
    Report,
    free_port_range,
    loadavg,
    meterdrop_cli,
    percentile,
    preamble,
    say,
    work_folder,
)

DEVICES = 100  # the reading keys' device pool ...
STEPS = 96  # ... times a day of quarter-hours: 9,600 keys that every delivery draws from
DEVICES_PER_DELIVERY = 10
DEVICE_BASE = 2_000_000
FTPS_SOURCE_BLOCK = 1  # FTPS clients connect from 127.1.x.y, one address each
RETRIES_425 = 200  # STOR retries when every passive port is busy, as a patient client would


# -- what is delivered ---------------------------------------------------------------------------
def delivery_keys(index: int, steps: int) -> list[tuple[int, int]]:
    """The (device, quarter-hour) keys delivery ``index`` covers: a window that moves with ``index``,
    so that deliveries far apart in number still overlap (7 and 11 step through the whole pool)."""
    first_device, first_step = index * 7 % DEVICES, index * 11 % STEPS
    return [
        ((first_device + d) % DEVICES, (first_step + s) % STEPS)
        for d in range(DEVICES_PER_DELIVERY)
        for s in range(steps)
    ]


def delivery_csv(index: int, steps: int) -> bytes:
    """Delivery ``index`` as a Panoramic Measurements CSV; its energy column is ``index``, so the
    value stored for a key tells which delivery won."""
    lines = [HEADER]
    for device, step in delivery_keys(index, steps):
        at = (EPOCH + timedelta(minutes=15 * step)).strftime("%Y-%m-%dT%H:%M:%SZ")
        current = (device * 7 + step * 3 + index) % 100 / 10 + 0.1
        lines.append(
            f"{DEVICE_BASE + device},Meter {device},{at},15,77,Main,{current:.1f},230.0,"
            f"{current * 230:.1f},0.95,{index}"
        )
    return ("\n".join(lines) + "\n").encode()


def steps_for(file_kb: float) -> int:
    """Quarter-hours per device for a delivery of about ``file_kb`` KB."""
    per_step = len(delivery_csv(0, 2)) - len(delivery_csv(0, 1))
    return max(1, min(STEPS, round((file_kb * 1024 - len(HEADER) - 1) / per_step)))


def remote_name(index: int) -> str:
    return f"d{index:06d}.csv"


def index_of(path: str) -> int:
    return int(Path(path).stem[1:])


def source_address(block: int, n: int, per_address: int = 1) -> str:
    """The loopback address the ``n``-th client connects from: ``per_address`` clients share one.

    The whole of 127/8 reaches the server on 127.0.0.1, and the server counts FTPS
    connections per address, so spreading clients lets the default limit stand.
    """
    slot = n // per_address
    return f"127.{block}.{slot // 250}.{slot % 250 + 1}"


# -- the clients (worker processes) --------------------------------------------------------------
def worker_main(protocol: str, spec_path: Path) -> None:
    """Runs in a subprocess: one protocol's clients; prints "ready", waits for "go", then a JSON result."""
    spec = json.loads(spec_path.read_text())
    print("ready", flush=True)
    sys.stdin.readline()
    result = asyncio.run(_sftp_clients(spec)) if protocol == "sftp" else _ftps_clients(spec)
    print(json.dumps(result), flush=True)


def _chunks(items: Sequence[int], size: int) -> list[Sequence[int]]:
    return [items[at : at + size] for at in range(0, len(items), size)]


async def _sftp_clients(spec: dict[str, Any]) -> dict[str, Any]:
    import asyncssh

    uploads: list[dict[str, Any]] = []
    sessions = 0
    key = asyncssh.read_private_key(spec["key"])

    async def one(client: dict[str, Any]) -> None:
        nonlocal sessions
        for chunk in _chunks(client["deliveries"], spec["per_session"]):
            left = list(chunk)
            try:
                async with (
                    asyncssh.connect(
                        "127.0.0.1",
                        spec["port"],
                        username=client["user"],
                        client_keys=[key],
                        known_hosts=None,
                        preferred_auth="publickey",
                    ) as conn,
                    conn.start_sftp_client() as sftp,
                ):
                    sessions += 1
                    while left:
                        index = left[0]
                        name = remote_name(index)
                        data = delivery_csv(index, spec["steps"])
                        started = time.time()
                        try:
                            async with sftp.open(name, "wb") as remote:  # the close publishes it
                                await remote.write(data)
                        except asyncssh.SFTPError as error:
                            uploads.append({"file": f"{client['user']}/{name}", "error": repr(error)})
                        else:
                            uploads.append(
                                {
                                    "file": f"{client['user']}/{name}",
                                    "started": started,
                                    "done": time.time(),
                                    "retries": 0,
                                }
                            )
                        left.pop(0)
            except Exception as error:  # any failure is a result to report, not a crash
                for index in left:  # the session broke: what it had not sent is lost
                    uploads.append(
                        {"file": f"{client['user']}/{remote_name(index)}", "error": f"session: {error!r}"}
                    )

    await asyncio.gather(*(one(c) for c in spec["clients"]))
    return {"uploads": uploads, "sessions": sessions}


def _ftps_clients(spec: dict[str, Any]) -> dict[str, Any]:
    uploads: list[dict[str, Any]] = []
    sessions = [0]
    lock = threading.Lock()

    def record(entry: dict[str, Any]) -> None:
        with lock:
            uploads.append(entry)

    def store(ftp: ftplib.FTP_TLS, name: str, data: bytes) -> int:
        """STOR, retried while every passive port is busy (425); the retries."""
        for retries in range(RETRIES_425 + 1):
            try:
                ftp.storbinary(f"STOR {name}", io.BytesIO(data), blocksize=256 * 1024)
                return retries
            except ftplib.error_temp as error:
                if not str(error).startswith("425") or retries == RETRIES_425:
                    raise
                time.sleep(0.05)  # a client's back-off before asking for a passive port again
        raise AssertionError("unreachable")

    def one(client: dict[str, Any]) -> None:
        for chunk in _chunks(client["deliveries"], spec["per_session"]):
            left = list(chunk)
            ftp = ftplib.FTP_TLS(timeout=120, source_address=(client["source"], 0))
            try:
                ftp.connect("127.0.0.1", spec["port"])
                ftp.login(client["user"], client["password"])
                ftp.prot_p()
                with lock:
                    sessions[0] += 1
                while left:
                    name = remote_name(left[0])
                    data = delivery_csv(left[0], spec["steps"])
                    started = time.time()
                    try:
                        retries = store(ftp, name, data)
                    except ftplib.Error as error:  # refused, the session goes on
                        record({"file": f"{client['user']}/{name}", "error": repr(error)})
                    else:
                        record(
                            {
                                "file": f"{client['user']}/{name}",
                                "started": started,
                                "done": time.time(),
                                "retries": retries,
                            }
                        )
                    left.pop(0)
                with contextlib.suppress(OSError, EOFError, ftplib.Error):
                    ftp.quit()
            except Exception as error:  # any failure is a result to report, not a crash
                for index in left:
                    record({"file": f"{client['user']}/{remote_name(index)}", "error": f"session: {error!r}"})
            finally:
                ftp.close()

    threads = [threading.Thread(target=one, args=(c,)) for c in spec["clients"]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"uploads": uploads, "sessions": sessions[0]}


# -- the server's footprint ----------------------------------------------------------------------
@dataclass
class Footprint:
    rss_mib: float  # the server and its children
    fds: int
    connections: int  # TCP connections other than listening sockets


def footprint(server: Meterdrop) -> Footprint:
    import psutil

    processes = [server.ps]
    with contextlib.suppress(psutil.Error):
        processes += server.ps.children(recursive=True)
    rss = fds = 0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            rss += process.memory_info().rss
            fds += process.num_fds()
    connections = sum(1 for c in server.ps.net_connections(kind="tcp") if c.status != psutil.CONN_LISTEN)
    return Footprint(rss / MiB, fds, connections)


def quiesce(server: Meterdrop, timeout: float = 120.0) -> Footprint:
    """Wait until no client connection is left, the server's CPU is idle and its fd count is
    steady: the state in which start and end are compared. Polls; gives up after ``timeout``."""
    deadline = time.monotonic() + timeout
    while footprint(server).connections and time.monotonic() < deadline:
        time.sleep(0.2)
    server.wait_idle(seconds=1.0, below=5.0, timeout=max(1.0, deadline - time.monotonic()))
    previous = footprint(server)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = footprint(server)
        if current.fds == previous.fds and not current.connections:
            return current
        previous = current
    return previous


# -- the ledger, as a reader sees it ---------------------------------------------------------------
class LedgerWatch:
    """Polls the ledger read-only for new entries; when each path was first visible to a reader."""

    def __init__(self, database: Path) -> None:
        self.reader = LedgerReader(database)
        self.last_id = 0
        self.first_seen: dict[str, float] = {}  # "<user>/<name>" -> time.time()
        self.polls = self.locked = 0

    def poll(self, patience: float = 1.0) -> None:
        """One look; while the server holds the database, retry every 50 ms for up to ``patience``
        seconds, as `meterdrop query` does, so the first sighting is not late by a whole interval."""
        self.polls += 1
        deadline = time.monotonic() + patience
        while (
            rows := self.reader.try_read("SELECT id, path FROM files WHERE id > ?", [self.last_id])
        ) is None:
            self.locked += 1
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        now = time.time()
        for file_id, path in rows:
            self.first_seen.setdefault(path.split("/drop/", 1)[-1], now)
            self.last_id = max(self.last_id, int(file_id))


# -- one phase: clients deliver, the backlog drains ----------------------------------------------
@dataclass
class Phase:
    name: str
    uploads: list[dict[str, Any]] = field(default_factory=list)
    sessions: int = 0
    go: float = 0.0
    uploads_done: float = 0.0  # the last client's last upload
    drained: float = 0.0  # when the reader first saw the last of them
    timed_out: bool = False
    samples: list[tuple[float, Footprint]] = field(default_factory=list)  # (seconds since go, footprint)

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [u for u in self.uploads if "done" in u]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [u for u in self.uploads if "done" not in u]


@dataclass
class SoakConfig:
    work: Path
    deliveries: int = 10_000
    clients: int = 50
    file_kb: float = 16.0
    warmup: int = 100
    per_session: int = 20
    passive_ports: int = 9
    checkpoints: int = 1  # the soak phase in this many parts, each drained and sampled (RSS trend)
    poll: float = 1.0
    ingest_timeout: float = 600.0
    log: Callable[[str], None] = say


def run_phase(
    name: str,
    server: Meterdrop,
    watch: LedgerWatch,
    cfg: SoakConfig,
    clients: list[dict[str, Any]],
    indexes: Sequence[int],
    steps: int,
    key: Path,
) -> Phase:
    """Deliver ``indexes`` (delivery i by client i mod clients) and wait until the ledger holds them."""
    phase = Phase(name)
    mine = {c["user"]: {**c, "deliveries": []} for c in clients}
    for index in indexes:
        mine[clients[index % len(clients)]["user"]]["deliveries"].append(index)
    workers: dict[str, subprocess.Popen[str]] = {}
    outputs: dict[str, str] = {}
    try:
        for protocol in ("sftp", "ftps"):
            chosen = [c for c in mine.values() if c["protocol"] == protocol and c["deliveries"]]
            if not chosen:
                continue
            spec = {
                "port": server.sftp_port if protocol == "sftp" else server.ftps_port,
                "key": str(key),
                "steps": steps,
                "per_session": cfg.per_session,
                "clients": chosen,
            }
            spec_path = cfg.work / f"spec-{re.sub(r'[^a-z0-9]+', '-', name)}-{protocol}.json"
            spec_path.write_text(json.dumps(spec))
            workers[protocol] = subprocess.Popen(
                [sys.executable, __file__, "--worker", protocol, "--spec", str(spec_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        for protocol, process in workers.items():
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{protocol} worker did not start")

        def collect(protocol: str, process: subprocess.Popen[str]) -> None:
            assert process.stdout is not None
            outputs[protocol] = process.stdout.read()

        collectors = [threading.Thread(target=collect, args=item, daemon=True) for item in workers.items()]
        phase.go = time.time()
        for process in workers.values():
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        for thread in collectors:
            thread.start()
        expected: set[str] | None = None
        deadline = float("inf")
        while True:
            time.sleep(cfg.poll)  # the reader's polling interval (a user's query every second)
            watch.poll(patience=cfg.poll)
            phase.samples.append((time.time() - phase.go, footprint(server)))
            if expected is None and not any(t.is_alive() for t in collectors):
                for protocol, text in outputs.items():
                    try:
                        result = json.loads(text.strip().splitlines()[-1])
                    except (IndexError, json.JSONDecodeError):
                        raise RuntimeError(f"{protocol} worker printed no result") from None
                    phase.uploads += result["uploads"]
                    phase.sessions += result["sessions"]
                expected = {u["file"] for u in phase.ok}
                phase.uploads_done = max((u["done"] for u in phase.ok), default=phase.go)
                deadline = time.monotonic() + cfg.ingest_timeout
            if expected is not None and expected <= watch.first_seen.keys():
                phase.drained = max((watch.first_seen[f] for f in expected), default=phase.go)
                break
            if time.monotonic() > deadline or server.process.poll() is not None:
                phase.timed_out = True
                phase.drained = time.time()
                break
    finally:
        for process in workers.values():
            if process.poll() is None:
                process.kill()
            process.wait()
    return phase


# -- the whole soak ----------------------------------------------------------------------------
@dataclass
class SoakResult:
    cfg: SoakConfig
    steps: int = 0
    rows_per_delivery: int = 0
    n_sftp: int = 0
    n_ftps: int = 0
    phases: list[Phase] = field(default_factory=list)
    before: Footprint | None = None  # after start-up, before any delivery
    start: Footprint | None = None  # after the warm-up, quiesced
    end: Footprint | None = None  # after everything, quiesced
    checkpoints: list[Footprint] = field(default_factory=list)  # after each part of the soak phase, quiesced
    rss_peak: float = 0.0
    fds_peak: int = 0
    connections_peak: int = 0
    ledger_entries: int = 0
    once: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)  # in the ledger, but not once as ingested with its rows
    keys_expected: int = 0
    keys_stored: int = 0
    newest_wrong: list[str] = field(default_factory=list)
    duplicate_keys: int = 0
    check_code: int | None = None
    check_said: str = ""
    ingest_latency: list[float] = field(default_factory=list)  # soak phase: done -> ingested_at
    visible_latency: list[float] = field(default_factory=list)  # soak phase: done -> first seen by the reader
    polls: int = 0
    locked_polls: int = 0
    log_counts: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)  # the server's warning/error lines by kind
    stop_code: int | None = None
    stop_seconds: float = 0.0

    @property
    def soak_phases(self) -> list[Phase]:
        """The phases after the warm-up (all of them when there was none)."""
        return [p for p in self.phases if p.name != "warm-up"]

    @property
    def uploads(self) -> list[dict[str, Any]]:
        return [u for p in self.phases for u in p.uploads]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [u for p in self.phases for u in p.failed]

    @property
    def delivered(self) -> int:
        return sum(len(p.ok) for p in self.phases)

    @property
    def wall_seconds(self) -> float:
        """First upload to last delivery visible, per phase, added up (the settling between them excluded)."""
        return sum(p.drained - p.go for p in self.phases)

    @property
    def rss_growth(self) -> float:
        assert self.start is not None and self.end is not None
        return self.end.rss_mib / self.start.rss_mib - 1


def make_clients(cfg: SoakConfig) -> list[dict[str, Any]]:
    n_sftp = cfg.clients // 2
    clients = []
    for c in range(cfg.clients):
        if c < n_sftp:
            clients.append({"protocol": "sftp", "user": f"s{c:03d}"})
        else:
            clients.append(
                {
                    "protocol": "ftps",
                    "user": f"f{c:03d}",
                    "password": secrets.token_urlsafe(12),
                    "source": source_address(FTPS_SOURCE_BLOCK, c - n_sftp),
                }
            )
    return clients


def run_soak(cfg: SoakConfig) -> SoakResult:
    """The whole soak in ``cfg.work``: users, server, both phases, then every check."""
    from fileserver.users import UserStore

    log = cfg.log
    result = SoakResult(cfg)
    result.steps = steps_for(cfg.file_kb)
    result.rows_per_delivery = result.steps * DEVICES_PER_DELIVERY
    key = cfg.work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    data = cfg.work / "data"
    clients = make_clients(cfg)
    result.n_sftp = sum(c["protocol"] == "sftp" for c in clients)
    result.n_ftps = len(clients) - result.n_sftp
    users = UserStore(data)
    pub = key.with_suffix(".pub").read_text()
    for client in clients:
        users.add(client["user"], client.get("password"), [pub] if client["protocol"] == "sftp" else None)
    passive = free_port_range(cfg.passive_ports)
    server = Meterdrop(data, passive, cfg.work / "serve.log")
    watch = LedgerWatch(server.database)
    try:
        result.before = quiesce(server)
        log(
            f"   serve pid {server.process.pid}: SFTP {server.sftp_port}, FTPS {server.ftps_port}, "
            f"passive {passive.start}-{passive.stop - 1}; "
            f"RSS {result.before.rss_mib:.0f} MiB, {result.before.fds} fds"
        )
        warm = min(cfg.warmup, cfg.deliveries)
        parts: list[tuple[str, range]] = [("warm-up", range(warm))]
        rest = range(warm, cfg.deliveries)
        n_parts = max(1, min(cfg.checkpoints, len(rest)))
        for part in range(n_parts):
            name = "soak" if n_parts == 1 else f"soak {part + 1}/{n_parts}"
            parts.append((name, rest[len(rest) * part // n_parts : len(rest) * (part + 1) // n_parts]))
        for name, indexes in parts:
            if not indexes:
                continue
            log(f"   {name}: {len(indexes):,} deliveries   load average {loadavg()}")
            phase = run_phase(name, server, watch, cfg, clients, indexes, result.steps, key)
            result.phases.append(phase)
            settled = quiesce(server)
            if name == "warm-up":
                result.start = settled
            else:
                result.checkpoints.append(settled)
            log(
                f"   {name}: {len(phase.ok):,} uploaded, {len(phase.failed)} failed, "
                f"{phase.sessions} sessions; uploads took {phase.uploads_done - phase.go:.1f}s, "
                f"all visible after {phase.drained - phase.go:.1f}s"
                f"{' (GAVE UP WAITING)' if phase.timed_out else ''}; then RSS {settled.rss_mib:.0f} MiB, "
                f"{settled.fds} fds, {settled.connections} connections   load average {loadavg()}"
            )
        result.end = quiesce(server)
        if result.start is None:  # no warm-up asked for: compare with the server as it started
            result.start = result.before
        samples = [f for p in result.phases for _, f in p.samples]
        result.rss_peak = max([f.rss_mib for f in samples] + [result.end.rss_mib])
        result.fds_peak = max([f.fds for f in samples] + [result.end.fds])
        result.connections_peak = max([f.connections for f in samples], default=0)
        result.polls, result.locked_polls = watch.polls, watch.locked
        done = meterdrop_cli("check", "--data-dir", str(data))
        result.check_code = done.returncode
        result.check_said = (
            (done.stdout.strip() or done.stderr.strip()).splitlines()[0]
            if (done.stdout.strip() or done.stderr.strip())
            else ""
        )
        verify(result, server, watch)
    finally:
        result.stop_code, result.stop_seconds = server.stop()
        for what, pattern in (
            ("warning/error lines", r" (WARNING|ERROR) "),
            ("incomplete uploads", "incomplete"),
            ("rejected files", r"rejected "),
            ("PASV 425s", "all passive ports busy"),
        ):
            result.log_counts[what] = server.count_log(pattern)
        result.warnings = warning_kinds(server.lines)
    return result


def warning_kinds(lines: Sequence[str]) -> dict[str, int]:
    """The server's warning and error lines by kind (numbers, addresses and paths blanked), most
    frequent first: a count alone would not say whether they are the expected ones."""
    kinds: dict[str, int] = {}
    for line in lines:
        if " WARNING " not in line and " ERROR " not in line:
            continue
        text = line.split(" ", 2)[-1].strip()  # without the date and time
        text = re.sub(r"/\S+", "PATH", text)
        text = re.sub(r"\d+", "N", text)[:120]
        kinds[text] = kinds.get(text, 0) + 1
    return dict(sorted(kinds.items(), key=lambda item: -item[1]))


def verify(result: SoakResult, server: Meterdrop, watch: LedgerWatch) -> None:
    """Exactly once, newest wins, no duplicate key; latencies from the final ledger."""
    reader = LedgerReader(server.database)
    ledger = reader.read("SELECT path, status, rows, ingested_at, delivered_at FROM files")
    result.ledger_entries = len(ledger)
    by_file: dict[str, list[tuple[str, int, datetime | None, datetime, str]]] = {}
    for path, status, rows, ingested_at, delivered_at in ledger:
        by_file.setdefault(path.split("/drop/", 1)[-1], []).append(
            (status, rows, ingested_at, delivered_at, path)
        )
    uploaded = {u["file"]: u for u in result.uploads if "done" in u}
    good = {
        f
        for f, entries in by_file.items()
        if len(entries) == 1 and entries[0][0] == "ingested" and entries[0][1] == result.rows_per_delivery
    }
    result.once = len(good & uploaded.keys())
    result.missing = sorted(uploaded.keys() - by_file.keys())
    result.extra = sorted(by_file.keys() - uploaded.keys())
    result.wrong = sorted(by_file.keys() - good)
    # Newest wins: replay the deliveries in version order (delivered_at, then the path as the
    # ledger spells it); the last delivery to cover a key is the one whose value must be stored.
    winner: dict[tuple[int, int], int] = {}
    for _, _, index in sorted((by_file[f][0][3], by_file[f][0][4], index_of(f)) for f in good):
        for k in delivery_keys(index, result.steps):
            winner[k] = index
    result.keys_expected = len(winner)
    stored = reader.read("SELECT device_id, measurement_time, energy_wh FROM panoramic_measurements")
    result.keys_stored = len(stored)
    for device_id, at, energy in stored:
        k = (int(device_id) - DEVICE_BASE, int((at - EPOCH).total_seconds()) // 900)
        if winner.get(k) != int(energy):
            result.newest_wrong.append(f"{k}: stored {energy}, expected {winner.get(k)}")
    result.duplicate_keys = reader.read(
        "SELECT count(*) FROM (SELECT device_id, measurement_time, resolution_minutes "
        "FROM panoramic_measurements "
        "GROUP BY ALL HAVING count(*) > 1)"
    )[0][0]
    for upload in (u for p in result.soak_phases for u in p.ok):
        entries = by_file.get(upload["file"])
        if entries and entries[0][2] is not None:
            result.ingest_latency.append(entries[0][2].timestamp() - upload["done"])
        if upload["file"] in watch.first_seen:
            result.visible_latency.append(watch.first_seen[upload["file"]] - upload["done"])


# -- report ----------------------------------------------------------------------------------------
def _pcts(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return " / ".join(f"{percentile(values, p):.2f}" for p in (50, 95, 99)) + " s"


def report(result: SoakResult) -> Report:
    cfg = result.cfg
    out = Report()
    assert result.start is not None and result.end is not None
    warmed = sum(len(p.uploads) for p in result.phases if p.name == "warm-up")
    out.add(
        "soak",
        "deliveries, clients, size",
        f"{cfg.deliveries:,} ({warmed} warm-up + {cfg.deliveries - warmed:,}) "
        f"from {result.n_sftp} SFTP + {result.n_ftps} FTPS clients, {result.rows_per_delivery} rows "
        f"(~{cfg.file_kb:g} KB) each, {cfg.per_session} per session",
        "",
        "",
        "",
        "",
    )
    wall = result.wall_seconds
    out.add(
        "soak",
        "wall time, first upload -> last delivery visible",
        f"{wall / 60:.1f} min ({wall:.0f} s)",
        "",
        "",
        "< 15 min",
        "yes" if wall < 900 and not any(p.timed_out for p in result.phases) else "NO",
    )
    uploads_span = sum(p.uploads_done - p.go for p in result.phases)
    out.add(
        "soak",
        "throughput: delivered and visible / uploaded",
        f"{result.delivered / max(wall, 1e-9):.1f} / "
        f"{result.delivered / max(uploads_span, 1e-9):.1f} deliveries/s",
        "",
        "",
        "",
        "",
    )
    out.add(
        "soak",
        "upload done -> visible to a reader p50 / p95 / p99",
        _pcts(result.visible_latency),
        f"reader polls every {cfg.poll:g} s",
        "",
        "",
        "",
    )
    out.add(
        "soak", "upload done -> ingested_at p50 / p95 / p99", _pcts(result.ingest_latency), "", "", "", ""
    )
    exact = (
        result.once == cfg.deliveries
        and not result.failed
        and not result.missing
        and not result.extra
        and not result.wrong
    )
    out.add(
        "soak",
        "in the ledger exactly once / missing / failed uploads / unexpected",
        f"{result.once:,}/{cfg.deliveries:,} / {len(result.missing)} / {len(result.failed)} / "
        f"{len(result.extra)}",
        "",
        "",
        "all once, none lost",
        "yes" if exact else "NO",
    )
    newest = (
        not result.newest_wrong and result.keys_stored == result.keys_expected and not result.duplicate_keys
    )
    out.add(
        "soak",
        "newest wins: keys holding the newest delivery's value",
        f"{result.keys_stored - len(result.newest_wrong):,}/{result.keys_expected:,}; duplicate keys "
        f"{result.duplicate_keys}",
        "",
        "",
        "all",
        "yes" if newest else "NO",
    )
    out.add(
        "soak",
        "`meterdrop check`",
        f"exit {result.check_code}: {result.check_said[:90]}",
        "",
        "",
        "exit 0",
        "yes" if result.check_code == 0 else "NO",
    )
    out.add(
        "soak",
        "server RSS start / end (peak)",
        f"{result.start.rss_mib:.0f} / {result.end.rss_mib:.0f} MiB ({result.rss_growth:+.1%}; peak "
        f"{result.rss_peak:.0f})",
        f"{result.before.rss_mib:.0f} MiB at start-up" if result.before else "",
        "",
        "<= +20%",
        "yes" if result.rss_growth <= 0.20 else "NO",
    )
    if len(result.checkpoints) > 1:
        out.add(
            "soak",
            f"server RSS after each of {len(result.checkpoints)} parts, drained",
            " / ".join(f"{f.rss_mib:.0f}" for f in result.checkpoints) + " MiB",
            "",
            "",
            "",
            "",
        )
    out.add(
        "soak",
        "server open fds start / end (peak)",
        f"{result.start.fds} / {result.end.fds} "
        f"(peak {result.fds_peak}, {result.connections_peak} connections)",
        "",
        "",
        "equal",
        "yes" if result.start.fds == result.end.fds else "NO",
    )
    out.add(
        "soak",
        "sessions; STOR retries after 425; server log",
        f"{sum(p.sessions for p in result.phases)}; {sum(u.get('retries', 0) for u in result.uploads)}; "
        + ", ".join(f"{n} {what}" for what, n in result.log_counts.items()),
        "",
        "",
        "",
        "",
    )
    return out


def timeline(result: SoakResult, every: float = 60.0) -> list[str]:
    """The soak's footprint about once a minute: growth shows as a trend, not only an end value."""
    lines = []
    for phase in result.soak_phases:
        due = 0.0
        for seconds, f in phase.samples:
            if seconds >= due:
                lines.append(
                    f"   {phase.name}: t={seconds:5.0f}s  RSS {f.rss_mib:6.0f} MiB  fds {f.fds:4d}  "
                    f"connections {f.connections:3d}"
                )
                due = seconds + every
    return lines


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--deliveries", type=int, default=10_000, help="deliveries in all (default 10000)")
    parser.add_argument(
        "--clients", type=int, default=50, help="concurrent clients, half SFTP half FTPS (default 50)"
    )
    parser.add_argument(
        "--file-kb", type=float, default=16.0, help="size of each delivery in KB (default 16)"
    )
    parser.add_argument(
        "--warmup", type=int, default=100, help="deliveries before the start sample (default 100)"
    )
    parser.add_argument("--per-session", type=int, default=20, help="deliveries per connection (default 20)")
    parser.add_argument(
        "--passive-ports", type=int, default=9, help="FTPS passive ports (default 9, as deployed)"
    )
    parser.add_argument(
        "--checkpoints",
        type=int,
        default=1,
        help="split the soak into N parts, each drained and sampled (default 1: one go)",
    )
    parser.add_argument(
        "--poll", type=float, default=1.0, help="seconds between the reader's looks (default 1)"
    )
    parser.add_argument(
        "--ingest-timeout",
        type=float,
        default=600.0,
        help="seconds to wait after a phase's last upload for the ledger to hold all",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (log, database)")
    parser.add_argument("--worker", choices=("sftp", "ftps"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.spec)
        return 0
    began = time.time()
    preamble("meterdrop soak", "bench_soak.py", argv)
    with work_folder(args.workdir, "meterdrop-bench-soak-", args.keep) as work:
        say(f"work folder: {work}")
        cfg = SoakConfig(
            work,
            deliveries=args.deliveries,
            clients=args.clients,
            file_kb=args.file_kb,
            warmup=args.warmup,
            per_session=args.per_session,
            passive_ports=args.passive_ports,
            checkpoints=args.checkpoints,
            poll=args.poll,
            ingest_timeout=args.ingest_timeout,
        )
        result = run_soak(cfg)
    say("\n== soak phase, the server's footprint over time")
    for line in timeline(result):
        say(line)
    for upload in result.failed[:5]:
        say(f"   failed: {upload['file']}: {upload['error']}")
    for what, items in (
        ("missing", result.missing),
        ("unexpected", result.extra),
        ("wrong", result.wrong),
        ("newest-wins mismatch", result.newest_wrong),
    ):
        if items:
            say(f"   {what} ({len(items)}): {items[:5]}")
    for kind, n in list(result.warnings.items())[:6]:
        say(f"   server log, {n}x: {kind}")
    say(
        f"   reader: {result.polls} looks at the ledger; {result.locked_polls} attempts found it locked "
        "by the server "
        "(retried every 50 ms)"
    )
    say(f"   SIGTERM -> exit {result.stop_code} in {result.stop_seconds:.1f}s")
    say(f"\n== results ({(time.time() - began) / 60:.1f} min; load average at end: {loadavg()})\n")
    table = report(result)
    say(table.table())
    say(
        "\nstart/end: after the warm-up and after the last delivery, each once the backlog had drained, "
        "every "
        "client connection had closed and the server's CPU was idle."
    )
    good = all(row.met != "NO" for row in table.rows)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
