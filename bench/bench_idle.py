"""Idle connections: does a large upload slow down while hundreds of authenticated sessions sit idle?

Standalone and print-only: it measures and reports (tests/test_load.py runs a short version
and asserts that the upload completes and is ingested and the idle sessions still answer).

    ./run python bench/bench_idle.py                         # 300 idle connections, 1 GiB uploads
    ./run python bench/bench_idle.py --idle 50 --size-mb 100 # a quick look

Why: vendors' export jobs keep sessions open between deliveries. Issue #5 asks that 300 idle
authenticated connections cost a running 1 GB upload no more than 10% of its speed.

How:
- `meterdrop serve` as a subprocess on 127.0.0.1 with free ports (bench_servers.Meterdrop),
  started with `--idle-timeout 3600`: the default of 300 s would close idle FTPS sessions
  during the run (the figure would then be for fewer connections than claimed). All other
  limits stay at their defaults.
- The idle connections are held by a separate process (``IdleHolder``), half SFTP (asyncssh,
  public-key login, an SFTP channel open on each) and half FTPS (ftplib.FTP_TLS, logged in,
  ``PROT P`` done). FTPS connections come from 127.2.x.y source addresses, 5 per address,
  so the server's default limit of 10 control connections per address stays in force
  (no `--max-connections-per-ip`). SFTP clients answer the server's keep-alives on their own.
- One upload of --size-mb MB of random bytes with OpenSSH `sftp` (key auth,
  `-o Ciphers=aes128-gcm@openssh.com`, batch mode) and one with curl over explicit FTPS
  (`curl --ssl-reqd -k -T FILE ftp://127.0.0.1:PORT/NAME`), with no idle connection and
  with the idle connections held; --repeat rounds (3), the order within a round
  alternating (none first, then idle first, ...). After each upload the watcher's work on
  it (a SHA-256, then "rejected: unrecognised format") is waited for, so it cannot overlap
  the next measurement. Reported: the median MB/s of each and the ratio idle / none
  (goal >= 0.9), the server's RSS, fds and connections with the idle sessions held, and
  whether every idle session still answers (SFTP stat, FTPS NOOP) after the uploads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ftplib
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_servers import (
    LedgerReader,
    Meterdrop,
    MiB,
    Report,
    add_user,
    curl_put,
    free_port_range,
    loadavg,
    make_source,
    preamble,
    say,
    sftp_put,
    wait_ledger,
    work_folder,
)
from bench_soak import Footprint, footprint, quiesce, source_address

CIPHER = "aes128-gcm@openssh.com"
IDLE_SOURCE_BLOCK = 2  # idle FTPS sessions come from 127.2.x.y ...
PER_ADDRESS = 5  # ... five per address, half the server's default limit of 10
IDLE_TIMEOUT = 3600  # `serve --idle-timeout`: longer than the run


# -- the idle connections (a worker process) -------------------------------------------------------
class IdleHolder:
    """Holds authenticated SFTP and FTPS sessions open in a subprocess, on command.

    A process of its own, so that the connections cost the benchmark's clients nothing and
    the SFTP sessions' asyncio loop keeps answering the server's keep-alives.
    """

    def __init__(
        self,
        *,
        work: Path,
        sftp_port: int,
        ftps_port: int,
        sftp: int,
        ftps: int,
        user: str,
        password: str,
        key: Path,
    ) -> None:
        spec = work / "idle-spec.json"
        spec.write_text(
            json.dumps(
                {
                    "sftp_port": sftp_port,
                    "ftps_port": ftps_port,
                    "sftp": sftp,
                    "ftps": ftps,
                    "user": user,
                    "password": password,
                    "key": str(key),
                }
            )
        )
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", "hold", "--spec", str(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def command(self, what: str) -> dict[str, Any]:
        """Send "open", "check" or "close"; the holder's answer (counts, errors, seconds)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(what + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"idle holder exited ({self.process.poll()}) on {what!r}")
        return dict(json.loads(line))

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError, RuntimeError):
                self.command("quit")
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def hold_main(spec_path: Path) -> None:
    """Runs in a subprocess: holds the sessions; one JSON line per command read from stdin."""
    asyncio.run(_hold(json.loads(spec_path.read_text())))


async def _hold(spec: dict[str, Any]) -> None:
    import asyncssh

    loop = asyncio.get_running_loop()
    key = asyncssh.read_private_key(spec["key"])
    pool = ThreadPoolExecutor(max_workers=8)  # ftplib blocks; 8 logins at a time (argon2 on the server)
    handshakes = asyncio.Semaphore(20)
    sftp: list[tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]] = []
    ftps: list[ftplib.FTP_TLS] = []

    async def open_sftp() -> None:
        async with handshakes:
            conn = await asyncssh.connect(
                "127.0.0.1",
                spec["sftp_port"],
                username=spec["user"],
                client_keys=[key],
                known_hosts=None,
                preferred_auth="publickey",
            )
            sftp.append((conn, await conn.start_sftp_client()))

    def open_ftps(n: int) -> None:
        ftp = ftplib.FTP_TLS(
            timeout=60, source_address=(source_address(IDLE_SOURCE_BLOCK, n, PER_ADDRESS), 0)
        )
        try:
            ftp.connect("127.0.0.1", spec["ftps_port"])
            ftp.login(spec["user"], spec["password"])
            ftp.prot_p()
        except BaseException:
            ftp.close()
            raise
        ftps.append(ftp)

    async def run_all(calls: list[Callable[[], Any]]) -> dict[str, Any]:
        started = time.monotonic()
        outcomes = await asyncio.gather(*(call() for call in calls), return_exceptions=True)
        errors = [repr(o) for o in outcomes if isinstance(o, BaseException)]
        return {
            "ok": len(outcomes) - len(errors),
            "errors": errors[:5],
            "failed": len(errors),
            "seconds": time.monotonic() - started,
        }

    async def check_sftp(sftp_client: asyncssh.SFTPClient) -> None:
        await asyncio.wait_for(sftp_client.stat("."), 30)

    async def close_sftp(conn: asyncssh.SSHClientConnection, client: asyncssh.SFTPClient) -> None:
        client.exit()
        conn.close()
        await conn.wait_closed()

    def close_ftps(ftp: ftplib.FTP_TLS) -> None:
        try:
            ftp.quit()
        finally:
            ftp.close()

    while True:
        command = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if command in ("", "quit"):
            for conn, _ in sftp:
                conn.close()
            for ftp in ftps:
                ftp.close()
            pool.shutdown(wait=False)
            return
        if command == "open":
            calls: list[Callable[[], Any]] = [open_sftp for _ in range(spec["sftp"])]
            calls += [lambda n=n: loop.run_in_executor(pool, open_ftps, n) for n in range(spec["ftps"])]
            answer = await run_all(calls)
        elif command == "check":
            calls = [lambda c=c: check_sftp(c) for _, c in sftp]
            calls += [lambda f=f: loop.run_in_executor(pool, f.voidcmd, "NOOP") for f in ftps]
            answer = await run_all(calls)
        elif command == "close":
            calls = [lambda c=c, s=s: close_sftp(c, s) for c, s in sftp]
            calls += [lambda f=f: loop.run_in_executor(pool, close_ftps, f) for f in ftps]
            answer = await run_all(calls)
            sftp.clear()
            ftps.clear()
        else:
            answer = {"error": f"unknown command {command!r}"}
        answer.update(sftp=len(sftp), ftps=len(ftps))
        print(json.dumps(answer), flush=True)


# -- the benchmark -----------------------------------------------------------------------------------
@dataclass
class IdleConfig:
    work: Path
    idle: int = 300
    size_mb: int = 1024
    repeat: int = 3
    log: Callable[[str], None] = say


@dataclass
class IdleResult:
    cfg: IdleConfig
    rates: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (protocol, none|idle) -> MB/s
    # the server's CPU seconds (user + system) while the client ran: unlike the wall time it
    # hardly moves with other work on the machine, and idle sessions that cost work would show
    cpu: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    alone: Footprint | None = None  # no client connected
    held: list[Footprint] = field(default_factory=list)  # with the idle sessions open, before the uploads
    opened: list[dict[str, Any]] = field(default_factory=list)
    checked: list[dict[str, Any]] = field(default_factory=list)  # after the uploads
    after: Footprint | None = None  # every connection closed again
    statuses: list[str] = field(default_factory=list)  # ledger status of each upload
    tls: str = ""
    stop_code: int | None = None

    def median(self, protocol: str, state: str, of: str = "rates") -> float:
        values = getattr(self, of).get((protocol, state), [])
        return statistics.median(values) if values else float("nan")

    def paired_ratio(self, protocol: str) -> float:
        """Median over rounds of idle / none within the round: drift in the machine's load cancels."""
        pairs = zip(
            self.rates.get((protocol, "idle"), []), self.rates.get((protocol, "none"), []), strict=False
        )
        ratios = [idle / none for idle, none in pairs]
        return statistics.median(ratios) if ratios else float("nan")


def run_idle(cfg: IdleConfig) -> IdleResult:
    log, work = cfg.log, cfg.work
    result = IdleResult(cfg)
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    data = work / "data"
    password = secrets.token_urlsafe(18)
    add_user(data, "bench", password, key.with_suffix(".pub"))  # the uploads
    add_user(data, "idle", password, key.with_suffix(".pub"))  # the idle sessions
    source = work / "source.bin"
    size = cfg.size_mb * MiB
    started = time.perf_counter()
    make_source(source, size)
    log(f"   wrote {cfg.size_mb} MB of random bytes in {time.perf_counter() - started:.1f}s")
    server = Meterdrop(data, free_port_range(9), work / "serve.log", ["--idle-timeout", str(IDLE_TIMEOUT)])
    holder = IdleHolder(
        work=work,
        sftp_port=server.sftp_port,
        ftps_port=server.ftps_port,
        sftp=cfg.idle // 2,
        ftps=cfg.idle - cfg.idle // 2,
        user="idle",
        password=password,
        key=key,
    )
    reader = LedgerReader(server.database)
    folder = data / "drop" / "bench"
    count = 0

    def upload(protocol: str, state: str) -> None:
        nonlocal count
        count += 1
        name = f"up-{protocol}-{state}-{count}.bin"
        cpu_before = server.cpu_seconds()
        if protocol == "sftp":
            seconds, used = sftp_put(server.sftp_port, "bench", key, CIPHER, source, name, work / "batch")
        else:
            seconds, used = curl_put(server.ftps_port, "bench", password, source, name)
            result.tls = used
        cpu = server.cpu_seconds() - cpu_before
        result.cpu.setdefault((protocol, state), []).append(cpu)
        final = folder / name
        present = final.stat().st_size if final.exists() else -1
        rate = size / MiB / seconds
        result.rates.setdefault((protocol, state), []).append(rate)
        result.statuses.append(wait_ledger(reader, final))  # the watcher hashed it: done with it
        server.wait_idle()
        final.unlink(missing_ok=True)
        log(
            f"   {protocol:<4} {state:<4} {seconds:6.2f}s {rate:7.1f} MB/s, server CPU {cpu:5.2f}s [{used}] "
            f"{'ok' if present == size else f'WRONG SIZE {present}'}, {result.statuses[-1]}   "
            f"load {loadavg()}"
        )

    try:
        result.alone = quiesce(server)
        log(f"   serve: RSS {result.alone.rss_mib:.0f} MiB, {result.alone.fds} fds with no client")
        for round_ in range(cfg.repeat):
            states = ("none", "idle") if round_ % 2 == 0 else ("idle", "none")
            for state in states:
                if state == "idle":
                    opened = holder.command("open")
                    result.opened.append(opened)
                    held = footprint(server)
                    result.held.append(held)
                    log(
                        f"   opened {opened['ok']} idle sessions ({opened['sftp']} SFTP, "
                        f"{opened['ftps']} FTPS) in {opened['seconds']:.1f}s, {opened['failed']} failed "
                        f"{opened['errors'][:2]}; serve: RSS "
                        f"{held.rss_mib:.0f} MiB, {held.fds} fds, {held.connections} connections"
                    )
                protocols = ("sftp", "ftps") if round_ % 2 == 0 else ("ftps", "sftp")
                for protocol in protocols:
                    upload(protocol, state)
                if state == "idle":
                    checked = holder.command("check")
                    result.checked.append(checked)
                    log(
                        f"   after the uploads {checked['ok']}/{checked['sftp'] + checked['ftps']} "
                        "idle sessions "
                        f"still answer {checked['errors'][:2]}"
                    )
                    holder.command("close")
                    quiesce(server)
        result.after = quiesce(server)
    finally:
        holder.stop()
        result.stop_code, _ = server.stop()
    return result


def report(result: IdleResult) -> Report:
    cfg = result.cfg
    out = Report()
    n_sftp, n_ftps = cfg.idle // 2, cfg.idle - cfg.idle // 2
    for protocol, client in (("sftp", f"OpenSSH sftp, {CIPHER}"), ("ftps", f"curl FTPS [{result.tls}]")):
        none, idle = result.median(protocol, "none"), result.median(protocol, "idle")
        ratio = idle / none
        out.add(
            "idle",
            f"{cfg.size_mb} MB upload, {client}: with {cfg.idle} idle, MB/s (median of {cfg.repeat})",
            f"{idle:.0f}",
            f"{none:.0f} (no idle connection)",
            f"{ratio:.2f}x",
            ">= 0.9x",
            "yes" if ratio >= 0.9 else "NO",
        )
        cpu_none, cpu_idle = result.median(protocol, "none", "cpu"), result.median(protocol, "idle", "cpu")
        out.add(
            "idle",
            "  same, per-round ratio (median); server CPU s per upload, idle / none",
            f"{result.paired_ratio(protocol):.2f}x; {cpu_idle:.2f} / {cpu_none:.2f} s",
            "",
            f"CPU {cpu_idle / cpu_none:.2f}x",
            "(diagnostic)",
            "",
        )
    if result.held and result.alone is not None:
        held = result.held[0]
        per = (held.rss_mib - result.alone.rss_mib) * 1024 / max(cfg.idle, 1)
        out.add(
            "idle",
            f"server with {cfg.idle} idle ({n_sftp} SFTP + {n_ftps} FTPS): RSS / fds / connections",
            f"{held.rss_mib:.0f} MiB / {held.fds} / {held.connections}; RSS in later rounds "
            + ", ".join(f"{h.rss_mib:.0f}" for h in result.held[1:]),
            f"{result.alone.rss_mib:.0f} MiB / {result.alone.fds} / {result.alone.connections} (none)",
            f"~{per:.0f} KiB per connection",
            "",
            "",
        )
    opened = min((o["ok"] for o in result.opened), default=0)
    answered = min((c["ok"] for c in result.checked), default=0)
    out.add(
        "idle",
        "idle sessions opened / still answering after the uploads (worst round)",
        f"{opened} / {answered} of {cfg.idle}",
        "",
        "",
        "all",
        "yes" if opened == answered == cfg.idle else "NO",
    )
    if result.after is not None and result.alone is not None:
        out.add(
            "idle",
            "server with no client, before / after: fds; RSS",
            f"{result.alone.fds} / {result.after.fds}; "
            f"{result.alone.rss_mib:.0f} / {result.after.rss_mib:.0f} MiB",
            "",
            "",
            "equal",
            "yes" if result.alone.fds == result.after.fds else "NO",
        )
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--idle", type=int, default=300, help="idle connections, half SFTP half FTPS (300)")
    parser.add_argument(
        "--size-mb", type=int, default=1024, help="size of the upload in MB, 2^20 bytes (1024)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each measurement (3)")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (log, database)")
    parser.add_argument("--worker", choices=("hold",), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        hold_main(args.spec)
        return 0
    began = time.time()
    preamble("meterdrop idle connections", "bench_idle.py", argv)
    for tool in ("sftp", "ssh-keygen", "curl"):
        if not shutil.which(tool):
            say(f"ERROR: `{tool}` is missing (apt-get install -y openssh-client curl)")
            return 2
    with work_folder(args.workdir, "meterdrop-bench-idle-", args.keep) as work:
        say(f"work folder: {work}; serve runs with --idle-timeout {IDLE_TIMEOUT}")
        result = run_idle(IdleConfig(work, idle=args.idle, size_mb=args.size_mb, repeat=args.repeat))
    for (protocol, state), rates in sorted(result.rates.items()):
        say(f"   per round, {protocol} {state}: " + ", ".join(f"{r:.0f}" for r in rates) + " MB/s")
    say(f"   SIGTERM -> exit {result.stop_code}")
    say(f"\n== results ({(time.time() - began) / 60:.1f} min; load average at end: {loadavg()})\n")
    table = report(result)
    say(table.table())
    say("\nMB = 2^20 bytes. The machine is shared: treat differences under ~10% as noise.")
    return 0 if all(row.met != "NO" for row in table.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
