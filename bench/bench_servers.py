"""File-server benchmarks for meterdrop: SFTP and FTPS upload speed against OpenSSH and vsftpd,
and 50 concurrent clients from upload to queryable rows.

Standalone and print-only: it measures and reports, it never asserts a timing.

    ./run python bench/bench_servers.py                      # full run (what bench/README.md shows)
    ./run python bench/bench_servers.py --quick              # 100 MB, 10 clients: a smoke test
    ./run python bench/bench_servers.py --only concurrent    # one case: sftp_upload, ftps_upload, concurrent

Cases (see bench/README.md, section "File servers"):
  sftp_upload  one large file uploaded with OpenSSH `sftp` (key auth, batch mode), once with
               aes128-gcm@openssh.com and once with chacha20-poly1305@openssh.com, to
               `meterdrop serve` and to OpenSSH's own sshd + sftp-server started here on loopback;
               also, as a diagnostic, to meterdrop's SFTP server alone (no watcher) in its own process
  ftps_upload  the same file uploaded with `curl --ssl-reqd` to `meterdrop serve` and to vsftpd
               with TLS started here on loopback (and to meterdrop's FTPS server alone)
  concurrent   `meterdrop serve`; 50 clients (half SFTP with asyncssh, half FTPS with ftplib)
               each upload 20 Panoramic Measurements CSVs of 1 MB; per file, the time from upload
               completion to `ingested_at` in the ledger; exactly-once and no-loss checks; then the
               same files through `meterdrop ingest` alone, for the ingest rate it can reach

The baselines (sshd, vsftpd) need root, `apt-get install -y openssh-server vsftpd`, and a
Linux account (`mdbench`) that the script creates with useradd and removes at the end.
Everything else goes to a temporary folder (``--workdir``), deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ftplib
import json
import os
import platform
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
CASES = ("sftp_upload", "ftps_upload", "concurrent")
CIPHERS = ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com")
SSHD = "/usr/sbin/sshd"
VSFTPD = "/usr/sbin/vsftpd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
ACCOUNT = "mdbench"  # the Linux account the baselines' clients log in as
INSTALL_HINT = "apt-get update && apt-get install -y openssh-server vsftpd"
HEADER = (
    "device_id, device_name, measurement_time(UTC), resolution(minutes), site_id, site_name, "
    "current(A), voltage(V), power(W), power_factor, energy(Wh)"
)
DEVICES_PER_FILE = 100
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
POLL_SECONDS = 0.5


# -- small helpers ------------------------------------------------------------------------------
def say(text: str = "") -> None:
    print(text, flush=True)


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_range(count: int) -> range:
    """``count`` consecutive ports that are free now."""
    for base in range(30000 + os.getpid() % 1000 * 20, 60000, 37):
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return range(base, base + count)
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port range")


def wait_port(port: int, process: subprocess.Popen[Any], what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on {port} after {timeout:.0f}s")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def run(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False, **kwargs)


def meterdrop_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterdrop", *args], input=stdin, capture_output=True,
                          text=True, check=False, timeout=300, cwd=ROOT)  # fmt: skip


def command_version(cmd: Sequence[str]) -> str:
    try:
        done = run(cmd, timeout=10)
    except OSError:
        return "missing"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "?"


def package_version(name: str) -> str:
    done = run(["dpkg-query", "-W", "-f=${Version}", name]) if shutil.which("dpkg-query") else None
    return done.stdout.strip() if done is not None and done.returncode == 0 and done.stdout.strip() else "?"


def machine_lines() -> list[str]:
    import asyncssh
    import cryptography
    import duckdb
    import OpenSSL
    import psutil
    import pyftpdlib

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = psutil.virtual_memory().total / 1024**3
    return [
        f"nproc: {os.cpu_count()}   cpu: {cpu}   memory: {memory:.1f} GiB",
        f"platform: {platform.platform()}",
        f"python {platform.python_version()}   asyncssh {asyncssh.__version__}   pyftpdlib {pyftpdlib.__ver__}   "
        f"pyOpenSSL {OpenSSL.__version__}   cryptography {cryptography.__version__}   duckdb {duckdb.__version__}",
        f"{ssl.OPENSSL_VERSION} (Python ssl)   {OpenSSL.SSL.OpenSSL_version(OpenSSL.SSL.OPENSSL_VERSION).decode()} "
        f"(pyOpenSSL)",
        f"clients: {command_version(['ssh', '-V'])}   {command_version(['curl', '--version'])}",
        f"baselines: openssh-server {package_version('openssh-server')}   vsftpd {package_version('vsftpd')}",
    ]


def preamble(title: str, script: str, argv: Sequence[str] | None) -> None:
    """The lines every server benchmark starts with: what ran, on what, under what load."""
    say(f"{title}, {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    say(
        f"command: ./run python bench/{script}"
        + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    )
    for line in machine_lines():
        if not line.startswith("baselines:"):
            say(line)
    say(f"load average at start: {loadavg()}")


@contextlib.contextmanager
def work_folder(parent: Path | None, prefix: str, keep: bool) -> Iterator[Path]:
    """A fresh folder for one benchmark run, removed afterwards unless ``keep``."""
    parent = parent or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    finally:
        if keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# -- result rows --------------------------------------------------------------------------------
@dataclass
class Row:
    case: str
    figure: str
    value: str
    baseline: str = ""
    ratio: str = ""
    goal: str = ""
    met: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *args: str) -> None:
        self.rows.append(Row(*args))

    def table(self) -> str:
        head = ("case", "figure", "value", "baseline", "ratio", "goal", "met?")
        cells = [head] + [(r.case, r.figure, r.value, r.baseline, r.ratio, r.goal, r.met) for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
        lines = [
            "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells
        ]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


# -- meterdrop serve ----------------------------------------------------------------------------
class Meterdrop:
    """A real `meterdrop serve` process on 127.0.0.1, with the ports it reported."""

    def __init__(
        self, data_dir: Path, passive: range, log_path: Path, extra_args: Sequence[str] = ()
    ) -> None:
        """``extra_args`` go to `meterdrop serve` as given (bench_idle.py raises `--idle-timeout`)."""
        import psutil

        self.data_dir = data_dir
        self.database = data_dir / "meterdrop.duckdb"
        self.passive = passive
        self.lines: list[str] = []
        self._log = log_path.open("w", encoding="utf-8")
        cmd = [sys.executable, "-m", "meterdrop", "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
               "--sftp-port", "0", "--ftps-port", "0", "--passive-ports", f"{passive.start}-{passive.stop - 1}",
               "--certs-dir", str(data_dir / "certs"), *extra_args]  # fmt: skip
        self.process = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                        cwd=ROOT)  # fmt: skip
        ports: dict[str, int] = {}
        ready = threading.Event()

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.lines.append(line)
                self._log.write(line)
                found = re.search(r"SFTP on [\d.]+:(\d+), FTPS on [\d.]+:(\d+)", line)
                if found:
                    ports.update(sftp=int(found.group(1)), ftps=int(found.group(2)))
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(120) or not ports:
            self.kill()
            raise RuntimeError("meterdrop serve did not start:\n" + "".join(self.lines[-20:]))
        self.sftp_port, self.ftps_port = ports["sftp"], ports["ftps"]
        self.ps = psutil.Process(self.process.pid)

    def rss_mib(self) -> float:
        return float(self.ps.memory_info().rss) / MiB

    def fds(self) -> int:
        return int(self.ps.num_fds())

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def wait_idle(self, seconds: float = 1.0, below: float = 5.0, timeout: float = 60.0) -> None:
        """Until the server used less than ``below`` % of one core for ``seconds``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            before = self.cpu_seconds()
            time.sleep(seconds)
            if (self.cpu_seconds() - before) / seconds * 100 < below:
                return

    def stop(self) -> tuple[int | None, float]:
        if self.process.poll() is not None:
            return self.process.returncode, 0.0
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = None
        self._reader.join(5)
        self._log.close()
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(Exception):
            self._log.close()

    def count_log(self, pattern: str) -> int:
        return sum(1 for line in self.lines if re.search(pattern, line))


def add_user(data_dir: Path, name: str, password: str, pubkey: Path) -> None:
    done = meterdrop_cli("users", "add", name, "--password-stdin", "--authorized-key", str(pubkey),
                         "--data-dir", str(data_dir), stdin=password + "\n")  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"meterdrop users add failed: {done.stderr}")


class LedgerReader:
    """Reads the database read-only while `serve` runs; the server holds it only per batch."""

    def __init__(self, database: Path) -> None:
        self.database = database

    def try_read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]] | None:
        """The rows, or None when the server holds the database (or it does not exist yet)."""
        import duckdb

        if not self.database.exists():
            return None
        try:
            con = duckdb.connect(str(self.database), read_only=True)
        except duckdb.IOException as error:
            if "lock" in str(error).lower():
                return None
            raise
        try:
            con.execute("SET TimeZone = 'UTC'")
            return con.execute(sql, list(params)).fetchall()
        except duckdb.CatalogException:
            return []  # the first batch has not created the tables yet
        finally:
            con.close()

    def read(self, sql: str, params: Sequence[Any] = (), timeout: float = 120.0) -> list[tuple[Any, ...]]:
        end = time.monotonic() + timeout
        while True:
            rows = self.try_read(sql, params)
            if rows is not None:
                return rows
            if time.monotonic() > end:
                raise TimeoutError(f"{self.database} stayed locked for {timeout:.0f}s")
            time.sleep(0.05)


# -- the baselines: a Linux account, sshd, vsftpd -----------------------------------------------
class Account:
    """The Linux account the baselines' clients log in as; removed at the end if created here.

    Its home is a folder of this run (vsftpd refuses a login whose home it cannot enter, even
    with ``local_root``); the shell is /bin/bash because PAM's pam_shells wants a listed one.
    """

    def __init__(self, home: Path) -> None:
        self.name = ACCOUNT
        self.password = secrets.token_urlsafe(18)
        home.mkdir(parents=True, exist_ok=True)
        try:
            pwd.getpwnam(self.name)
            self.created = False
            done = run(["usermod", "--home", str(home), self.name])
        except KeyError:
            done = run(
                ["useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/bash", self.name]
            )
            self.created = done.returncode == 0
        if done.returncode != 0:
            raise RuntimeError(f"useradd/usermod {self.name} failed: {done.stderr.strip()}")
        done = run(["chpasswd"], input=f"{self.name}:{self.password}\n")
        if done.returncode != 0:
            raise RuntimeError(f"chpasswd failed: {done.stderr.strip()}")
        entry = pwd.getpwnam(self.name)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.own(home)

    def own(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, self.uid, self.gid)
        return path

    def remove(self) -> None:
        if self.created:
            run(["userdel", self.name])


class _Daemon:
    """A baseline server process started by the benchmark, with its log file."""

    process: subprocess.Popen[bytes]
    _log: IO[str]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class OpenSshd(_Daemon):
    """OpenSSH's sshd on 127.0.0.1 with a throw-away configuration, host key and authorized key."""

    def __init__(self, folder: Path, account: Account, pubkey: Path, subsystem: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        hostkey = folder / "ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], check=True)
        authorized = folder / "authorized_keys"
        shutil.copyfile(pubkey, authorized)
        authorized.chmod(0o644)
        config = folder / "sshd_config"
        sftp = "internal-sftp" if subsystem == "internal-sftp" else SFTP_SERVER
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {hostkey}\nPidFile none\n"
            f"AuthorizedKeysFile {authorized}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin no\n"
            f"AllowUsers {account.name}\nX11Forwarding no\nAllowTcpForwarding no\nPrintMotd no\n"
            f"Subsystem sftp {sftp}\nLogLevel ERROR\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
        check = run([SSHD, "-t", "-f", str(config)])
        if check.returncode != 0:
            raise RuntimeError(f"sshd -t: {check.stderr.strip()}")
        self._log = (folder / "sshd.log").open("w")
        self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=self._log,
                                        stderr=subprocess.STDOUT)  # fmt: skip
        wait_port(self.port, self.process, "sshd")


class Vsftpd(_Daemon):
    """vsftpd with explicit TLS on 127.0.0.1, a self-signed certificate, passive mode only."""

    def __init__(self, folder: Path, account: Account, root: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        passive = free_port_range(9)
        cert, key = folder / "vsftpd.crt", folder / "vsftpd.key"
        made = run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)])  # fmt: skip
        if made.returncode != 0:
            raise RuntimeError(f"openssl req failed: {made.stderr.strip()}")
        config = folder / "vsftpd.conf"
        config.write_text(
            "listen=YES\nlisten_ipv6=NO\nlisten_address=127.0.0.1\n"
            f"listen_port={self.port}\nbackground=NO\nanonymous_enable=NO\nlocal_enable=YES\n"
            f"write_enable=YES\nlocal_umask=022\nlocal_root={root}\nchroot_local_user=NO\n"
            "pam_service_name=vsftpd\nuserlist_enable=NO\n"
            f"ssl_enable=YES\nrsa_cert_file={cert}\nrsa_private_key_file={key}\n"
            "allow_anon_ssl=NO\nforce_local_logins_ssl=YES\nforce_local_data_ssl=YES\n"
            "ssl_sslv2=NO\nssl_sslv3=NO\nssl_tlsv1=YES\nssl_ciphers=HIGH\nrequire_ssl_reuse=NO\n"
            f"pasv_enable=YES\npasv_min_port={passive.start}\npasv_max_port={passive.stop - 1}\n"
            "port_enable=NO\nconnect_from_port_20=NO\nseccomp_sandbox=NO\nisolate=NO\nisolate_network=NO\n"
            "xferlog_enable=NO\ndirmessage_enable=NO\nsecure_chroot_dir=/var/run/vsftpd/empty\n"
        )
        Path("/var/run/vsftpd/empty").mkdir(parents=True, exist_ok=True)
        self._log = (folder / "vsftpd.log").open("w")
        self.process = subprocess.Popen([VSFTPD, str(config)], stdout=self._log, stderr=subprocess.STDOUT)
        wait_port(self.port, self.process, "vsftpd")


def missing_baseline_tools() -> list[str]:
    missing = [p for p in (SSHD, SFTP_SERVER, VSFTPD) if not os.access(p, os.X_OK)]
    missing += [
        b for b in ("sftp", "ssh-keygen", "curl", "openssl", "useradd", "chpasswd") if not shutil.which(b)
    ]
    if os.geteuid() != 0:
        missing.append("root (sshd, vsftpd and useradd need it)")
    return missing


# -- clients ------------------------------------------------------------------------------------
def sftp_put(
    port: int, user: str, key: Path, cipher: str, source: Path, remote: str, batch: Path
) -> tuple[float, str]:
    """Upload with OpenSSH `sftp -b`; the wall time of the client and the cipher it negotiated."""
    batch.write_text(f"put {source} {remote}\n")
    cmd = ["sftp", "-F", "/dev/null", "-v", "-b", str(batch), "-i", str(key), "-P", str(port),
           f"-oCiphers={cipher}", "-oBatchMode=yes", "-oIdentitiesOnly=yes", "-oStrictHostKeyChecking=no",
           "-oUserKnownHostsFile=/dev/null", "-oCompression=no", f"{user}@127.0.0.1"]  # fmt: skip
    started = time.perf_counter()
    done = run(cmd, timeout=3600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"sftp exited {done.returncode}: {done.stderr.strip()[-800:]}")
    found = re.search(r"kex: client->server cipher: (\S+)", done.stderr)
    return seconds, found.group(1) if found else "?"


def curl_put(port: int, user: str, password: str, source: Path, name: str) -> tuple[float, str]:
    """Upload with curl over explicit FTPS; the wall time and the data connection's TLS version/cipher."""
    cmd = ["curl", "-sS", "-v", "--ssl-reqd", "-k", "--ftp-pasv", "-T", str(source),
           f"ftp://127.0.0.1:{port}/{name}", "--user", f"{user}:{password}", "-o", "/dev/null"]  # fmt: skip
    started = time.perf_counter()
    done = run(cmd, timeout=3600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"curl exited {done.returncode}: {done.stderr.strip()[-800:]}")
    tls = re.findall(r"SSL connection using (\S+ / \S+)", done.stderr)
    return seconds, tls[-1] if tls else "?"


def make_source(path: Path, size: int) -> None:
    """Incompressible content (no server may gain from compression)."""
    with path.open("wb") as out:
        left = size
        while left > 0:
            chunk = min(left, 4 * MiB)
            out.write(os.urandom(chunk))
            left -= chunk


# -- case 1 and 2: one large upload against a baseline -----------------------------------------
@dataclass
class Env:
    args: argparse.Namespace
    work: Path
    report: Report
    account: Account | None = None
    key: Path | None = None
    baselines_ok: bool = False


def wait_ledger(reader: LedgerReader, path: Path, timeout: float = 300.0) -> str:
    """Until the server's watcher recorded ``path`` (a random file: rejected); its status."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rows = reader.try_read("SELECT status FROM files WHERE path = ?", [str(path)])
        if rows:
            return str(rows[0][0])
        time.sleep(0.2)
    return "not in ledger"


@dataclass
class Target:
    """Where one large upload goes."""

    label: str
    port: int
    user: str
    password: str
    folder: Path  # where the file lands
    remote_folder: str  # the path the client names ("" = its login folder)
    serve: Meterdrop | None = None  # `meterdrop serve`: wait for its watcher after each upload


class ServerAlone:
    """meterdrop's SFTP or FTPS server alone in its own process: no watcher, no processor.

    Not a goal figure: it tells how much of `meterdrop serve`'s time is the server itself.
    """

    def __init__(self, protocol: str, data_dir: Path, work: Path) -> None:
        spec = work / f"alone-{protocol}.json"
        passive = free_port_range(9)
        spec.write_text(json.dumps({"protocol": protocol, "data": str(data_dir),
                                    "passive": [passive.start, passive.stop]}))  # fmt: skip
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", "alone", "--spec", str(spec)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.isdigit():
            self.stop()
            raise RuntimeError(f"meterdrop {protocol} server alone did not start: {line!r}")
        self.port = int(line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def alone_main(spec_path: Path) -> None:
    """Runs in a subprocess: one of meterdrop's servers, as `serve` configures it, minus the watcher."""
    import uvloop

    from fileserver.ftps import FtpsServer
    from fileserver.guard import Guard
    from fileserver.sftp import start_sftp_server, stop_sftp_server
    from fileserver.users import UserStore

    spec = json.loads(spec_path.read_text())
    data = Path(spec["data"])
    users, guard, limit = UserStore(data), Guard(), 4 * 1024**3  # serve's default --max-upload-size
    if spec["protocol"] == "sftp":

        async def run_sftp() -> None:
            acceptor = await start_sftp_server(host="127.0.0.1", port=0, users=users, guard=guard,
                                               certs_dir=data / "certs", max_upload_bytes=limit)  # fmt: skip
            print(acceptor.sockets[0].getsockname()[1], flush=True)
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()
            await stop_sftp_server(acceptor)

        uvloop.run(run_sftp())  # as `meterdrop serve` runs it
        return
    first, stop_at = spec["passive"]
    ftps = FtpsServer(host="127.0.0.1", port=0, passive_ports=range(first, stop_at), users=users, guard=guard,
                      certs_dir=data / "certs", max_upload_bytes=limit)  # fmt: skip
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    ftps.start()
    print(ftps.address[1], flush=True)
    done.wait()
    ftps.stop()


def large_upload_case(env: Env, case: str) -> None:
    args, work = env.args, env.work
    sftp = case == "sftp_upload"
    size = args.size_mb * MiB
    say(f"\n== {case}: {args.size_mb} MB upload, {args.repeat} round(s)   load average before: {loadavg()}")
    source = work / "source.bin"
    if not source.exists() or source.stat().st_size != size:
        started = time.perf_counter()
        make_source(source, size)
        say(
            f"   wrote {source} ({size / MiB:.0f} MB of random bytes) in {time.perf_counter() - started:.1f}s"
        )
    assert env.key is not None
    pub = env.key.with_suffix(".pub")
    password = secrets.token_urlsafe(18)
    data = work / f"{case}-data"
    add_user(data, "bench", password, pub)
    alone_data = work / f"{case}-alone-data"
    add_user(alone_data, "bench", password, pub)
    base_name = "OpenSSH" if sftp else "vsftpd"
    server: Meterdrop | None = None
    alone: ServerAlone | None = None
    baseline: OpenSshd | Vsftpd | None = None
    rss_peak = rss_end = 0.0
    results: dict[tuple[str, str], list[float]] = {}
    negotiated: dict[tuple[str, str], str] = {}
    variants = CIPHERS if sftp else ("tls",)
    try:
        server = Meterdrop(data, free_port_range(9), work / f"{case}-serve.log")
        targets = [Target("meterdrop", server.sftp_port if sftp else server.ftps_port, "bench", password,
                          data / "drop" / "bench", "", serve=server)]  # fmt: skip
        alone = ServerAlone("sftp" if sftp else "ftps", alone_data, work)
        targets.append(Target("alone", alone.port, "bench", password, alone_data / "drop" / "bench", ""))
        if env.baselines_ok and env.account is not None:
            root = env.account.own(work / f"{case}-baseline-root")
            if sftp:
                baseline = OpenSshd(work / "sshd", env.account, pub, args.openssh_subsystem)
                targets.append(Target(base_name, baseline.port, env.account.name, "", root, f"{root}/"))
            else:
                baseline = Vsftpd(work / "vsftpd", env.account, root)
                targets.append(
                    Target(base_name, baseline.port, env.account.name, env.account.password, root, "")
                )
        rss_peak = server.rss_mib()
        for round_ in range(args.repeat):
            for variant in variants:
                turn = round_ % len(targets)  # each target goes first in turn
                for target in targets[turn:] + targets[:turn]:
                    name = f"up-{variant.split('@')[0]}-{round_}.bin"
                    final = target.folder / name
                    if sftp:
                        seconds, used = sftp_put(target.port, target.user, env.key, variant, source,
                                                 target.remote_folder + name, work / "batch")  # fmt: skip
                    else:
                        seconds, used = curl_put(target.port, target.user, target.password, source, name)
                    if target.serve is not None:
                        rss_peak = max(rss_peak, target.serve.rss_mib())
                    present = final.stat().st_size if final.exists() else -1
                    ok = "ok" if present == size else f"WRONG SIZE {present}"
                    rate = size / MiB / seconds
                    results.setdefault((variant, target.label), []).append(rate)
                    negotiated[(variant, target.label)] = used
                    say(f"   round {round_ + 1} {variant:<30} {target.label:<9} {seconds:7.2f}s {rate:8.1f} MB/s  "
                        f"[{used}] file {ok}   load {loadavg()}")  # fmt: skip
                    if target.serve is not None:
                        # Let the watcher finish with it (sha256, then rejected: not a data file).
                        status = wait_ledger(LedgerReader(target.serve.database), final)
                        target.serve.wait_idle()
                        if status != "rejected":
                            say(f"   note: the random upload's ledger status is {status!r}")
                    final.unlink(missing_ok=True)
        rss_end = server.rss_mib()
    finally:
        code, stop_seconds = server.stop() if server is not None else (None, 0.0)
        for other in (alone, baseline):
            if other is not None:
                other.stop()
    say(f"   meterdrop serve RSS peak seen {rss_peak:.0f} MiB, at end {rss_end:.0f} MiB; "
        f"SIGTERM -> exit {code} in {stop_seconds:.1f}s; load average after: {loadavg()}")  # fmt: skip
    goal = 0.9 if sftp else 1.0
    for variant in variants:
        rates = {label: results.get((variant, label), []) for label in ("meterdrop", "alone", base_name)}
        medians = {label: statistics.median(r) if r else float("nan") for label, r in rates.items()}
        label = variant.split("@")[0] if sftp else "curl, " + negotiated.get((variant, "meterdrop"), "?")
        say("   " + variant + ": " + "; ".join(
            f"{who} {', '.join(f'{r:.0f}' for r in r_list)} MB/s" for who, r_list in rates.items() if r_list))  # fmt: skip
        theirs = medians[base_name]
        measured = bool(rates[base_name])
        for who, figure in (("meterdrop", "`meterdrop serve`"), ("alone", "server alone, no watcher")):
            ratio = medians[who] / theirs if measured else float("nan")
            env.report.add(
                case,
                f"{label}: {figure}, MB/s (median of {len(rates[who])})",
                f"{medians[who]:.1f}",
                f"{theirs:.1f} ({base_name})" if measured else "not measured",
                f"{ratio:.2f}x" if measured else "",
                f">= {goal}x" if who == "meterdrop" else "(diagnostic)",
                ("yes" if ratio >= goal else "NO") if who == "meterdrop" and measured else "",
            )
    if not sftp and ("tls", base_name) in negotiated:
        env.report.notes.append(f"ftps_upload TLS: meterdrop {negotiated[('tls', 'meterdrop')]}, "
                                f"vsftpd {negotiated[('tls', base_name)]}")  # fmt: skip


# -- case 3: concurrent clients -----------------------------------------------------------------
def device_blocks(steps: int) -> list[str]:
    """Per device, its rows with an ``@ID@`` placeholder for the device id."""
    blocks = []
    for dev in range(DEVICES_PER_FILE):
        lines = []
        for step in range(steps):
            at = (EPOCH + timedelta(minutes=15 * step)).strftime("%Y-%m-%dT%H:%M:%SZ")
            current = ((dev * 7 + step * 3) % 100) / 10 + 0.1
            power = current * 230.0
            lines.append(f"@ID@,Sensor {dev + 1},{at},15,77,Main,{current:.1f},230.0,{power:.1f},0.95,"
                         f"{power / 4:.3f}\n")  # fmt: skip
        blocks.append("".join(lines))
    return blocks


def csv_content(blocks: list[str], file_index: int) -> str:
    """A Measurements file whose device ids (1,000,000 + 1,000 x file + device) no other file has."""
    first = 1_000_000 + file_index * 1000
    return HEADER + "\n" + "".join(b.replace("@ID@", str(first + d)) for d, b in enumerate(blocks))


def worker_main(protocol: str, spec_path: Path) -> None:
    """Runs in a subprocess: one protocol's clients; prints a JSON list of uploads."""
    spec = json.loads(spec_path.read_text())
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    results = asyncio.run(_sftp_clients(spec)) if protocol == "sftp" else _ftps_clients(spec)
    print(json.dumps(results), flush=True)


async def _sftp_clients(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import asyncssh

    results: list[dict[str, Any]] = []

    async def one(client: dict[str, Any]) -> None:
        try:
            async with (
                asyncssh.connect(
                    "127.0.0.1",
                    spec["port"],
                    username=client["user"],
                    client_keys=[spec["key"]],
                    known_hosts=None,
                    preferred_auth="publickey",
                ) as conn,  # fmt: skip
                conn.start_sftp_client() as sftp,
            ):
                for local, remote, size in client["files"]:
                    started = time.time()
                    try:
                        await sftp.put(local, remote)
                    except Exception as error:
                        results.append(
                            {"file": f"{client['user']}/{remote}", "error": repr(error), "bytes": size}
                        )
                        continue
                    results.append({"file": f"{client['user']}/{remote}", "started": started, "done": time.time(),
                                    "bytes": size, "retries": 0})  # fmt: skip
        except Exception as error:
            for _, remote, size in client["files"]:
                key = f"{client['user']}/{remote}"
                if not any(r["file"] == key for r in results):
                    results.append({"file": key, "error": f"session: {error!r}", "bytes": size})

    await asyncio.gather(*(one(c) for c in spec["clients"]))
    return results


def _ftps_clients(spec: dict[str, Any]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    sessions = threading.Semaphore(spec["sessions"])

    def one(client: dict[str, Any]) -> None:
        done_files: set[str] = set()
        try:
            with sessions:
                ftp = ftplib.FTP_TLS(timeout=120)
                ftp.connect("127.0.0.1", spec["port"])
                ftp.login(client["user"], client["password"])
                ftp.prot_p()
                for local, remote, size in client["files"]:
                    key = f"{client['user']}/{remote}"
                    started = time.time()
                    retries = 0
                    while True:
                        try:
                            with open(local, "rb") as stream:
                                ftp.storbinary(f"STOR {remote}", stream, blocksize=256 * 1024)
                            break
                        except ftplib.error_temp as error:
                            if str(error).startswith("425") and retries < 200:
                                retries += 1
                                time.sleep(0.05)
                                continue
                            raise
                    with lock:
                        results.append({"file": key, "started": started, "done": time.time(), "bytes": size,
                                        "retries": retries})  # fmt: skip
                    done_files.add(key)
                with contextlib.suppress(Exception):
                    ftp.quit()
        except Exception as error:
            with lock:
                for _, remote, size in client["files"]:
                    key = f"{client['user']}/{remote}"
                    if key not in done_files:
                        results.append({"file": key, "error": repr(error), "bytes": size})
                        done_files.add(key)

    threads = [threading.Thread(target=one, args=(c,)) for c in spec["clients"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def parse_uploads(outputs: dict[str, str]) -> list[dict[str, Any]]:
    uploads: list[dict[str, Any]] = []
    for protocol in ("sftp", "ftps"):
        try:
            uploads += json.loads(outputs.get(protocol, "").strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            say(f"   {protocol} worker printed no results")
    return uploads


def query_probes(data: Path, into: list[dict[str, Any]], stop: threading.Event, every: float = 10.0) -> None:
    """Run `meterdrop query` as a user would, every ``every`` s: how long each took, how it ended."""
    while not stop.is_set():
        started = time.monotonic()
        done = meterdrop_cli(
            "query", "--data-dir", str(data), "--format", "json", "SELECT count(*) AS n FROM files"
        )
        said = (done.stdout.strip() or done.stderr.strip()).splitlines()
        into.append(
            {"seconds": time.monotonic() - started, "code": done.returncode, "said": said[-1] if said else ""}
        )
        stop.wait(every)


def probe_connection_limit(port: int, count: int = 12) -> list[str]:
    """Open ``count`` control connections at once from 127.0.0.1; the first reply line of each."""
    sockets, replies = [], []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            sockets.append(s)
            time.sleep(0.02)
        for s in sockets:
            try:
                replies.append(s.makefile("rb").readline().decode(errors="replace").strip())
            except OSError as error:
                replies.append(f"error: {error}")
    finally:
        for s in sockets:
            s.close()
    return replies


def concurrent_case(env: Env) -> None:
    args, work, report = env.args, env.work, env.report
    from fileserver.users import UserStore

    n_clients, n_files = args.clients, args.files_per_client
    n_sftp = n_clients // 2
    n_ftps = n_clients - n_sftp
    say(f"\n== concurrent: {n_clients} clients ({n_sftp} SFTP asyncssh, {n_ftps} FTPS ftplib), {n_files} files "
        f"of ~1 MB each   load average before: {loadavg()}")  # fmt: skip
    # -- files
    started = time.perf_counter()
    row_bytes = len(csv_content(device_blocks(1), 0)) - len(HEADER) - 1  # 100 rows, one step
    steps = max(1, round((MiB - len(HEADER) - 1) / row_bytes))  # files of about 1 MiB
    blocks = device_blocks(steps)
    rows_per_file = DEVICES_PER_FILE * steps
    files_dir = work / "files"
    clients: list[dict[str, Any]] = []
    total_bytes = 0
    index = 0
    for c in range(n_clients):
        protocol = "sftp" if c < n_sftp else "ftps"
        user = f"{'s' if protocol == 'sftp' else 'f'}{c:02d}"
        folder = files_dir / user
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for f in range(n_files):
            local = folder / f"m{f:02d}.csv"
            body = csv_content(blocks, index).encode()
            local.write_bytes(body)
            files.append([str(local), f"m{f:02d}.csv", len(body)])
            total_bytes += len(body)
            index += 1
        clients.append(
            {"protocol": protocol, "user": user, "password": secrets.token_urlsafe(12), "files": files}
        )
    expected_files = index
    expected_rows = expected_files * rows_per_file
    say(f"   generated {expected_files} files ({total_bytes / MiB:.0f} MB, {rows_per_file:,} rows each, "
        f"{expected_rows:,} rows in all) in {time.perf_counter() - started:.1f}s")  # fmt: skip
    # -- users and server
    data = work / "concurrent-data"
    assert env.key is not None
    pub = env.key.with_suffix(".pub").read_text()
    started = time.perf_counter()
    add_user(data, "probe", secrets.token_urlsafe(12), env.key.with_suffix(".pub"))  # once through the CLI
    store = UserStore(data)
    for client in clients:
        if client["protocol"] == "sftp":
            store.add(client["user"], None, [pub])
        else:
            store.add(client["user"], client["password"], None)
    say(f"   added {len(clients) + 1} users in {time.perf_counter() - started:.1f}s")
    passive = free_port_range(9)
    server = Meterdrop(data, passive, work / "concurrent-serve.log")
    reader = LedgerReader(server.database)
    workers: dict[str, subprocess.Popen[str]] = {}
    try:
        time.sleep(1.0)
        rss_start, fds_start, cpu_start = server.rss_mib(), server.fds(), server.cpu_seconds()
        say(f"   meterdrop serve pid {server.process.pid}: SFTP {server.sftp_port}, FTPS {server.ftps_port}, "
            f"passive {passive.start}-{passive.stop - 1}; RSS {rss_start:.0f} MiB, {fds_start} open fds")  # fmt: skip
        replies = probe_connection_limit(server.ftps_port)
        refused = [i + 1 for i, r in enumerate(replies) if r.startswith("421")]
        say(f"   FTPS connection-limit probe (12 simultaneous control connections from 127.0.0.1): "
            f"{sum(r.startswith('220') for r in replies)} got 220, refused (421) from connection #"
            f"{refused[0] if refused else '-'}: {replies[refused[0] - 1] if refused else ''}")  # fmt: skip
        time.sleep(0.5)
        # -- workers
        for protocol in ("sftp", "ftps"):
            spec = {"port": server.sftp_port if protocol == "sftp" else server.ftps_port, "key": str(env.key),
                    "sessions": args.ftps_sessions, "clients": [c for c in clients if c["protocol"] == protocol]}  # fmt: skip
            spec_path = work / f"spec-{protocol}.json"
            spec_path.write_text(json.dumps(spec))
            workers[protocol] = subprocess.Popen(
                [sys.executable, __file__, "--worker", protocol, "--spec", str(spec_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
        for protocol, process in workers.items():
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"{protocol} worker did not start: {line!r}")
        outputs: dict[str, str] = {}

        def collect(protocol: str, process: subprocess.Popen[str]) -> None:
            assert process.stdout is not None
            outputs[protocol] = process.stdout.read()

        go = time.time()
        for process in workers.values():
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        collectors = [threading.Thread(target=collect, args=item) for item in workers.items()]
        for t in collectors:
            t.start()
        # -- poll the ledger while the clients upload and the server ingests
        first_seen: dict[str, float] = {}
        ledger: dict[str, tuple[str, float]] = {}
        polls = blocked = 0
        expected_in_ledger = expected_files
        query_runs: list[dict[str, Any]] = []
        query_stop = threading.Event()
        query_thread: threading.Thread | None = None
        blocked_since: float | None = None  # the reader has been locked out since
        longest_unreadable = 0.0
        rss_peak, fds_peak = rss_start, fds_start
        uploads_done_at: float | None = None
        deadline: float | None = None
        while True:
            # Like `meterdrop query`: retry every 50 ms while the server holds the database.
            time.sleep(0.05 if blocked_since is not None else POLL_SECONDS)
            rss_peak, fds_peak = max(rss_peak, server.rss_mib()), max(fds_peak, server.fds())
            polls += 1
            rows = reader.try_read("SELECT path, status, ingested_at FROM files")
            now = time.time()
            if rows is None:
                blocked += 1
                if blocked_since is None:
                    blocked_since = time.monotonic()
            else:
                if blocked_since is not None:
                    longest_unreadable = max(longest_unreadable, time.monotonic() - blocked_since)
                    blocked_since = None
                for path, status, ingested_at in rows:
                    key = path.split("/drop/", 1)[-1]
                    first_seen.setdefault(key, now)
                    ledger[key] = (status, ingested_at.timestamp() if ingested_at else float("nan"))
            alive = any(t.is_alive() for t in collectors)
            if not alive and uploads_done_at is None:
                uploads_done_at = time.monotonic()
                deadline = uploads_done_at + args.ingest_timeout
                uploads = parse_uploads(outputs)
                expected_in_ledger = sum(1 for u in uploads if "done" in u)
                # What a user's `meterdrop query` meets while the server works through the backlog.
                query_thread = threading.Thread(
                    target=query_probes, args=(data, query_runs, query_stop), daemon=True
                )
                query_thread.start()
            if not alive and len(ledger) >= expected_in_ledger:
                break
            if deadline is not None and time.monotonic() > deadline:
                say(f"   gave up waiting for the ledger after {args.ingest_timeout:.0f}s: {len(ledger)} of "
                    f"{expected_files} files in")  # fmt: skip
                break
            if server.process.poll() is not None:
                say("   meterdrop serve exited during the run!")
                break
        rss_end, fds_end, cpu_end = server.rss_mib(), server.fds(), server.cpu_seconds()
        query_stop.set()
        if query_thread is not None:
            query_thread.join(120)
    finally:
        for process in workers.values():
            if process.poll() is None:
                process.kill()
        code, stop_seconds = server.stop()
    # -- results
    uploads = parse_uploads(outputs)
    ok = [u for u in uploads if "done" in u]
    failed = [u for u in uploads if "done" not in u]
    retries = sum(u.get("retries", 0) for u in ok)
    finished = {u["file"]: u for u in ok}
    final_rows = LedgerReader(server.database).read(
        "SELECT path, status, rows, ingested_at FROM files ORDER BY path"
    )
    table_rows = LedgerReader(server.database).read("SELECT count(*) FROM panoramic_measurements")[0][0]
    dup_keys = LedgerReader(server.database).read(
        "SELECT count(*) FROM (SELECT device_id, measurement_time, resolution_minutes FROM panoramic_measurements "
        "GROUP BY ALL HAVING count(*) > 1)"
    )[0][0]
    by_path: dict[str, list[tuple[str, int, Any]]] = {}
    for path, status, rows, ingested_at in final_rows:
        by_path.setdefault(path.split("/drop/", 1)[-1], []).append((status, rows, ingested_at))
    once = [
        k for k, v in by_path.items() if len(v) == 1 and v[0][0] == "ingested" and v[0][1] == rows_per_file
    ]
    missing = sorted(set(finished) - set(by_path))
    extra = sorted(set(by_path) - set(finished))
    wrong = sorted(
        k
        for k, v in by_path.items()
        if not (len(v) == 1 and v[0][0] == "ingested" and v[0][1] == rows_per_file)
    )
    latencies = [by_path[k][0][2].timestamp() - u["done"] for k, u in finished.items()
                 if k in by_path and by_path[k][0][2] is not None]  # fmt: skip
    seen_latencies = [first_seen[k] - u["done"] for k, u in finished.items() if k in first_seen]
    last_done = max((u["done"] for u in ok), default=go)
    last_ingested = max((v[0][2].timestamp() for v in by_path.values() if v[0][2] is not None), default=go)
    upload_seconds = last_done - go
    e2e_seconds = last_ingested - go
    mb = sum(u["bytes"] for u in ok) / MiB
    per_protocol = {}
    for protocol, prefix in (("sftp", "s"), ("ftps", "f")):
        mine = [u for u in ok if u["file"].startswith(prefix)]
        if mine:
            span = max(u["done"] for u in mine) - go
            lat = [by_path[u["file"]][0][2].timestamp() - u["done"] for u in mine
                   if u["file"] in by_path and by_path[u["file"]][0][2] is not None]  # fmt: skip
            per_protocol[protocol] = (len(mine), span, sum(u["bytes"] for u in mine) / MiB / max(span, 1e-9),
                                      percentile(lat, 95) if lat else float("nan"))  # fmt: skip
    cpu_used = cpu_end - cpu_start
    say(f"   uploads: {len(ok)} complete, {len(failed)} failed, {retries} STOR retries after 425, "
        f"last upload done {upload_seconds:.1f}s after start; last file ingested {e2e_seconds:.1f}s after start")  # fmt: skip
    for protocol, (count, span, rate, p95) in per_protocol.items():
        say(f"   {protocol}: {count} files in {span:.1f}s ({rate:.1f} MB/s), p95 upload->ingested {p95:.2f}s")
    if failed:
        say(f"   first failures: {[(u['file'], u['error']) for u in failed[:3]]}")
    if latencies:
        say(f"   upload done -> ingested_at: p50 {percentile(latencies, 50):.2f}s  p95 {percentile(latencies, 95):.2f}s  "
            f"p99 {percentile(latencies, 99):.2f}s  max {max(latencies):.2f}s  min {min(latencies):.2f}s")  # fmt: skip
    if seen_latencies:
        say(f"   upload done -> first seen by a read-only reader (every {POLL_SECONDS}s, retry 50 ms while locked): "
            f"p50 {percentile(seen_latencies, 50):.2f}s  p95 {percentile(seen_latencies, 95):.2f}s  "
            f"max {max(seen_latencies):.2f}s")  # fmt: skip
    say(f"   reader: {polls} attempts, {blocked} found the database locked by the server; longest wait "
        f"for a read {longest_unreadable:.1f}s")  # fmt: skip
    for run_ in query_runs:
        say(f"   `meterdrop query` (every 10 s after the last upload): exit {run_['code']} after "
            f"{run_['seconds']:.1f}s: {run_['said'][:160]}")  # fmt: skip
    stamps = sorted(v[0][2].timestamp() for v in by_path.values() if v[0][2] is not None)
    ingest_rate = (
        (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else 0.0
    )
    say(f"   ingest rate (first to last ingested_at): {ingest_rate:.1f} files/s = "
        f"{ingest_rate * rows_per_file:,.0f} rows/s, {ingest_rate * total_bytes / max(expected_files, 1) / MiB:.1f} MB/s")  # fmt: skip
    say(f"   ledger: {len(final_rows)} rows for {len(by_path)} paths; ingested exactly once with "
        f"{rows_per_file:,} rows: {len(once)}; missing {len(missing)}; unexpected {len(extra)}; wrong {len(wrong)}")  # fmt: skip
    say(f"   panoramic_measurements: {table_rows:,} rows (expected {len(ok) * rows_per_file:,}); "
        f"duplicate keys: {dup_keys}")  # fmt: skip
    say(f"   server: RSS {rss_start:.0f} MiB at start, peak seen {rss_peak:.0f} MiB, {rss_end:.0f} MiB at end; "
        f"open fds {fds_start} -> peak {fds_peak} -> {fds_end}; CPU {cpu_used:.0f}s; SIGTERM -> exit {code} "
        f"in {stop_seconds:.1f}s")  # fmt: skip
    warnings = server.count_log(r" WARNING | ERROR ")
    say(f"   server log: {warnings} warning/error lines, {server.count_log('incomplete')} incomplete uploads, "
        f"{server.count_log(r'rejected ')} rejected files, {server.count_log('all passive ports busy')} PASV 425s")  # fmt: skip
    # Reference: the same files through `meterdrop ingest` alone (one process, no servers, no clients).
    started = time.perf_counter()
    alone = meterdrop_cli("ingest", "--quiet", "--data-dir", str(work / "ingest-only"), str(files_dir))
    alone_seconds = time.perf_counter() - started
    alone_rate = expected_files / alone_seconds
    say(f"   reference: `meterdrop ingest` of the same {expected_files} files into a fresh database: exit "
        f"{alone.returncode}, {alone_seconds:.1f}s (with Python start-up), {alone_rate:.1f} files/s")  # fmt: skip
    say(f"   load average after: {loadavg()}")
    # -- report
    report.add("concurrent", "clients x files (1 MB)", f"{n_sftp} SFTP + {n_ftps} FTPS x {n_files}",
               "", "", "", "")  # fmt: skip
    report.add("concurrent", "upload done -> ingested_at p50 / p95 / p99",
               f"{percentile(latencies, 50):.2f} / {percentile(latencies, 95):.2f} / {percentile(latencies, 99):.2f} s"
               if latencies else "-", "", "", "p95 < 2 s",
               "yes" if latencies and percentile(latencies, 95) < 2 else "NO")  # fmt: skip
    report.add("concurrent", "upload phase (start -> last upload)",
               f"{upload_seconds:.1f} s, {len(ok) / max(upload_seconds, 1e-9):.1f} files/s, "
               f"{mb / max(upload_seconds, 1e-9):.1f} MB/s", "", "", "", "")  # fmt: skip
    report.add("concurrent", "end to end (start -> last ingested)",
               f"{e2e_seconds:.1f} s, {len(by_path) / max(e2e_seconds, 1e-9):.1f} files/s, "
               f"{mb / max(e2e_seconds, 1e-9):.1f} MB/s", "", "", "", "")  # fmt: skip
    exact = (
        len(once) == expected_files
        and not failed
        and not missing
        and not extra
        and table_rows == expected_rows
    )
    report.add("concurrent", "ingested exactly once / lost / failed uploads",
               f"{len(once)}/{expected_files} / {len(missing)} / {len(failed)}", "", "",
               "all once, none lost", "yes" if exact else "NO")  # fmt: skip
    report.add("concurrent", "rows in panoramic_measurements", f"{table_rows:,}", f"{expected_rows:,} expected", "",
               "equal", "yes" if table_rows == expected_rows else "NO")  # fmt: skip
    report.add("concurrent", "ingest rate (first -> last ingested_at)",
               f"{ingest_rate:.1f} files/s, {ingest_rate * rows_per_file:,.0f} rows/s",
               f"{alone_rate:.1f} files/s (`meterdrop ingest`, same files)", f"{ingest_rate / alone_rate:.2f}x",
               "", "")  # fmt: skip
    report.add(
        "concurrent", "longest wait for a read-only open", f"{longest_unreadable:.1f} s", "", "", "", ""
    )
    if query_runs:
        failed_queries = [r for r in query_runs if r["code"] != 0]
        report.add("concurrent", "`meterdrop query` every 10 s during the backlog",
                   f"{len(query_runs)} runs, {len(failed_queries)} failed, longest {max(r['seconds'] for r in query_runs):.1f} s",
                   "", "", "", "")  # fmt: skip
        if failed_queries:
            report.notes.append(f"concurrent: `meterdrop query` failed after {failed_queries[0]['seconds']:.0f} s: "
                                f"{failed_queries[0]['said']}")  # fmt: skip
    report.add("concurrent", "server RSS start / peak / end",
               f"{rss_start:.0f} / {rss_peak:.0f} / {rss_end:.0f} MiB", "", "", "", "")  # fmt: skip
    report.add("concurrent", "server open fds start / peak / end", f"{fds_start} / {fds_peak} / {fds_end}",
               "", "", "", "")  # fmt: skip
    report.notes.append(
        f"concurrent: FTPS clients ran at most {args.ftps_sessions} sessions at once (`serve`'s default "
        f"--max-connections-per-ip of 10, kept here: probe {sum(r.startswith('220') for r in replies)}x 220, then "
        f"{replies[refused[0] - 1] if refused else 'no 421'!r}); {retries} STOR retries after 425; "
        f"reader found the DB locked in {blocked}/{polls} attempts, longest wait {longest_unreadable:.1f}s"
    )


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=None, help="size of the large upload in MB (2^20 bytes; "
                        "default 1024, 100 with --quick)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="100 MB, 1 round, 10 clients: a smoke test")
    parser.add_argument("--only", choices=CASES, help="run one case")
    parser.add_argument(
        "--repeat", type=int, default=None, help="rounds of each large upload (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=None,
        help="concurrent clients, half SFTP half FTPS (default 50; 10 with --quick)",
    )
    parser.add_argument(
        "--files-per-client", type=int, default=20, help="1 MB files each client uploads (default 20)"
    )
    parser.add_argument("--ftps-sessions", type=int, default=9,
                        help="FTPS sessions open at once (meterdrop allows 10 per address; 9 passive ports)")  # fmt: skip
    parser.add_argument("--ingest-timeout", type=float, default=600.0,
                        help="seconds to wait after the last upload for the ledger to hold every file")  # fmt: skip
    parser.add_argument("--openssh-subsystem", choices=("sftp-server", "internal-sftp"), default="sftp-server",
                        help="the baseline sshd's sftp subsystem (default: the sftp-server binary, Debian's default)")  # fmt: skip
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where temporary files go (default: the system temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, databases)")
    parser.add_argument("--worker", choices=("sftp", "ftps", "alone"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size_mb is None:
        args.size_mb = 100 if args.quick else 1024
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.clients is None:
        args.clients = 10 if args.quick else 50
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "alone":
        alone_main(args.spec)
        return 0
    if args.worker:
        worker_main(args.worker, args.spec)
        return 0
    command = "./run python bench/bench_servers.py" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv)
    )
    began = time.time()
    say(f"meterdrop file-server benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    say(f"command: {command}")
    machine = machine_lines()
    for line in machine:
        say(line)
    say(f"load average at start: {loadavg()}")
    if os.getloadavg()[0] > 0.5:
        say(f"WARNING: the machine is busy (load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores): "
            "expect noise in every figure")  # fmt: skip
    for tool in ("sftp", "ssh-keygen", "curl"):
        if not shutil.which(tool):
            say(f"ERROR: `{tool}` is missing (apt-get install -y openssh-client curl)")
            return 2
    cases = [args.only] if args.only else list(CASES)
    missing = missing_baseline_tools()
    baselines_ok = not missing
    if missing and any(c != "concurrent" for c in cases):
        say(f"WARNING: the baselines cannot run, missing: {', '.join(missing)}.\n"
            f"  Install them (as root) with: {INSTALL_HINT}\n  meterdrop alone is measured; ratios are not.")  # fmt: skip
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="meterdrop-bench-servers-", dir=parent))
    work.chmod(0o755)  # the baselines' account must reach its folders
    report = Report()
    env = Env(args, work, report, baselines_ok=baselines_ok)
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    env.key = key
    say(f"work folder: {work}")
    failures = 0
    try:
        if baselines_ok and any(c != "concurrent" for c in cases):
            env.account = Account(work / "home")
        for case in cases:
            try:
                if case == "concurrent":
                    concurrent_case(env)
                else:
                    large_upload_case(env, case)
            except Exception:
                failures += 1
                say(f"   CASE {case} FAILED:\n{traceback.format_exc()}")
                report.add(case, "failed (see the output above)", "", "", "", "", "NO")
    finally:
        if env.account is not None:
            env.account.remove()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    minutes = (time.time() - began) / 60
    say(f"\n== results ({minutes:.1f} min; load average at end: {loadavg()})\n")
    say(report.table())
    for note in report.notes:
        say(f"note: {note}")
    say("\nMB = 2^20 bytes. Ratios are meterdrop / baseline, measured in the same run; the machine is shared, "
        "so treat differences under ~10% as noise.")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
