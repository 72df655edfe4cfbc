"""The container: its image is built from the files the Dockerfile copies, and compose runs the same command."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

from tests.conftest import free_port_range

ROOT = Path(__file__).resolve().parents[1]


def _copied_by_the_dockerfile() -> list[str]:
    """The sources of the Dockerfile's COPY lines (each line: sources..., then the target)."""
    copied: list[str] = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied += shlex.split(line)[1:-1]
    return copied


def test_the_image_gets_every_module(tmp_path: Path) -> None:
    """A plain package list once left processor.greenbutton out of the wheel: every command failed
    in the container at import, while the editable install of ./run hid it."""
    source = tmp_path / "context"
    source.mkdir()
    for name in _copied_by_the_dockerfile():
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
         "--wheel-dir", str(tmp_path / "wheel"), str(source)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("meterdrop-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        path.relative_to(ROOT).as_posix()
        for package in ("meterdrop", "processor", "fileserver")
        for path in (ROOT / package).rglob("*.py")
    }
    assert "processor/greenbutton/espi.py" in modules
    assert modules - packaged == set()


def _dockerfile_json(instruction: str) -> list[str]:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    (line,) = [each for each in lines if each.startswith(instruction + " ")]
    return list(json.loads(line[len(instruction) + 1 :]))


def test_the_containers_command_runs_outside_a_container(tmp_path: Path) -> None:
    """The Dockerfile's command with compose's environment, ports moved to free ones: it serves,
    takes the public host from the environment (the certificate is named after it), passes
    compose's health check, and stops on SIGTERM with exit 0."""
    ports = free_port_range(11)
    sftp, ftps, passive = ports[0], ports[1], range(ports[2], ports[2] + 9)
    moved = {
        "22": str(sftp),
        "21": str(ftps),
        "8192-8200": f"{passive.start}-{passive.stop - 1}",
        "0.0.0.0": "127.0.0.1",
    }
    command = [moved.get(arg, arg) for arg in _dockerfile_json("ENTRYPOINT") + _dockerfile_json("CMD")]
    assert command[:2] == ["meterdrop", "serve"]
    compose = (ROOT / "compose.yaml").read_text()
    for name in ("METERDROP_DATA_DIR", "METERDROP_CERTS_DIR", "METERDROP_PUBLIC_HOST", "METERDROP_TIMEZONE"):
        assert re.search(rf"^\s+{name}:", compose, re.M), name  # compose sets what the server reads
    env = {**os.environ, "METERDROP_DATA_DIR": str(tmp_path / "data"), "METERDROP_CERTS_DIR": str(tmp_path / "certs"),
           "METERDROP_PUBLIC_HOST": "localhost", "METERDROP_TIMEZONE": "America/New_York"}  # fmt: skip
    cli = [sys.executable, "-m", "meterdrop"]
    added = subprocess.run([*cli, "users", "add", "acme", "--password-stdin"], input="a long passphrase\n",
                           env=env, capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert added.returncode == 0, added.stderr
    server = subprocess.Popen([*cli, *command[1:]], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        for line in server.stderr:
            if "SFTP on" in line:
                break
        else:
            raise AssertionError("serve ended before it listened")
        threading.Thread(target=server.stderr.read, daemon=True).start()  # keep the log pipe flowing
        # The certificate is named after the public host from the environment.
        certificate = (tmp_path / "certs" / "ftps.crt").read_text()
        names = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"], input=certificate,
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "DNS:localhost" in names, names
        health = json.loads(re.search(r"test: (\[.*\])", compose).group(1))  # type: ignore[union-attr]
        probe = [sys.executable if word == "python" else word.replace("(22, 21)", f"({sftp}, {ftps})")
                 for word in health[1:]]  # fmt: skip
        assert subprocess.run(probe, timeout=30, check=False).returncode == 0
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    assert (
        subprocess.run(probe, timeout=30, check=False, capture_output=True).returncode != 0
    )  # down: unhealthy
