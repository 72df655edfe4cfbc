"""The command line as a user runs it: real processes, real files, a real database."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import MEASUREMENTS_HEADER, PULSE_HEADER, SHARED, at, mount_tmpfs, write_delivery


def meterdrop(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterdrop", *args], capture_output=True, text=True, cwd=cwd,
                          check=False)  # fmt: skip


@pytest.fixture
def drops(tmp_path: Path) -> Path:
    folder = tmp_path / "exports"
    write_delivery(folder / "Measurements" / "a.csv",
                   [MEASUREMENTS_HEADER, "1,Chiller,2024-01-01T00:00:00Z,60,7,HQ,1,230,230,1,230"],
                   at("2024-01-01 01:00"))  # fmt: skip
    write_delivery(folder / "Pulse" / "b.csv",
                   [PULSE_HEADER, "G1,Gas,Boiler gas,m3,2024-01-01T00:00:00Z,60,7,HQ,500,500,2,3"],
                   at("2024-01-01 01:00"))  # fmt: skip
    write_delivery(folder / ".partial" / "hidden.csv", ["not, a, known, export"])
    return folder


@pytest.mark.parametrize("command", [[], ["ingest"], ["status"], ["query"], ["check"]])
def test_every_command_explains_itself_with_an_example(command: list[str]) -> None:
    result = meterdrop(*command, "--help")
    assert result.returncode == 0
    assert "Example" in result.stdout
    assert "--data-dir" in result.stdout or not command


def test_ingest_folder_then_status_and_query(tmp_path: Path, drops: Path) -> None:
    result = meterdrop("ingest", "--data-dir", str(tmp_path / "data"), str(drops))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        f"ingested  {drops}/Measurements/a.csv  (panoramic_measurements, 1 rows)",
        f"ingested  {drops}/Pulse/b.csv  (pulse_meter_measurements, 1 rows)",
    ]  # hidden folders are skipped
    assert "2 file(s), 0 rejected, 2 rows" in result.stderr

    again = meterdrop("ingest", "--data-dir", str(tmp_path / "data"), str(drops / "Measurements"))
    assert again.returncode == 0
    assert again.stdout.startswith(f"unchanged {drops}/Measurements/a.csv  (already ingested as file #1)")

    as_csv = meterdrop("query", "--data-dir", str(tmp_path / "data"), "--format", "csv",
                       "SELECT source, meter_id, quantity, unit, interval_start, value FROM energy_readings "
                       "WHERE quantity = 'energy' ORDER BY source")  # fmt: skip
    assert as_csv.returncode == 0, as_csv.stderr
    assert list(csv.reader(io.StringIO(as_csv.stdout))) == [
        ["source", "meter_id", "quantity", "unit", "interval_start", "value"],
        ["panoramic_measurements", "1", "energy", "Wh", "2024-01-01T00:00:00+00:00", "230.0"],
        ["pulse_meter_measurements", "G1", "energy", "Wh", "2024-01-01T00:00:00+00:00", "500.0"],
    ]
    as_json = meterdrop("query", "--data-dir", str(tmp_path / "data"), "--format", "json",
                        "SELECT device_name, interval_end FROM panoramic_measurements "
                        "JOIN energy_readings ON meter_id = device_id WHERE quantity = 'power'")  # fmt: skip
    assert json.loads(as_json.stdout) == [
        {"device_name": "Chiller", "interval_end": "2024-01-01T01:00:00+00:00"}
    ]
    as_table = meterdrop("query", "--data-dir", str(tmp_path / "data"), "SELECT count(*) AS n FROM files")
    assert "│ 2 │" in as_table.stdout


def test_many_small_files_share_transactions_and_each_gets_its_line(tmp_path: Path) -> None:
    """Newest delivery wins across files grouped together; a bad one among them is rejected alone."""
    folder = tmp_path / "exports"
    for n in range(30):
        write_delivery(folder / f"m{n:02d}.csv",
                       [MEASUREMENTS_HEADER, f"1,Chiller,2024-01-01T00:00:00Z,60,7,HQ,1,230,{n},1,230",
                        f"{n + 100},Pump,2024-01-01T00:00:00Z,60,7,HQ,1,230,1,1,1"],
                       at(f"2024-01-01 {n // 60:02d}:{n % 60:02d}"))  # fmt: skip
    write_delivery(
        folder / "m15b.csv", [MEASUREMENTS_HEADER, "1,Chiller,2024-01-01T00:00:00Z,60,7,HQ,1,230,x,1,3"]
    )
    result = meterdrop("ingest", "--db", str(tmp_path / "x.duckdb"), str(folder))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 31 and sum(line.startswith("ingested  ") for line in lines) == 30
    assert any(line.startswith(f"rejected  {folder}/m15b.csv") for line in lines)
    rows = meterdrop("query", "--db", str(tmp_path / "x.duckdb"), "--format", "json",
                     "SELECT count(*) AS n, max(power_w) FILTER (device_id = '1') AS chiller, "
                     "(SELECT count(*) FROM files WHERE status = 'ingested') AS files FROM panoramic_measurements")  # fmt: skip
    assert json.loads(rows.stdout) == [{"n": 31, "chiller": 29.0, "files": 30}]
    # now() is a transaction's start: files committed together share their ingested_at
    together = meterdrop("query", "--db", str(tmp_path / "x.duckdb"), "--format", "json",
                         "SELECT count(DISTINCT ingested_at) AS commits FROM files WHERE status = 'ingested'")  # fmt: skip
    assert json.loads(together.stdout)[0]["commits"] < 30


def test_ingest_of_panoramic_files_loads_no_server_and_no_green_button_parser(
    tmp_path: Path, drops: Path
) -> None:
    """Start-up is part of every `meterdrop ingest`: what a file does not need is not imported.

    pyarrow.dataset is what DuckDB would import to scan the rows handed to it (18 MiB); rich
    draws the progress bar and colours, which output to a pipe (as here) has neither of.
    """
    lazy = (
        "asyncssh",
        "pyftpdlib",
        "lxml",
        "processor.greenbutton.espi",
        "processor.greenbutton.utility_csv",
        "pyarrow.dataset",
        "pyarrow.compute",
        "rich",
    )
    script = (
        "import sys\n"
        "from meterdrop.cli import main\n"
        f"sys.argv = ['meterdrop', 'ingest', '--db', {str(tmp_path / 'x.duckdb')!r}, {str(drops)!r}]\n"
        "try:\n    main()\nexcept SystemExit as done:\n    print('exit', done.code)\n"
        f"print('loaded', sorted(m for m in {lazy!r} if sys.modules.get(m)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.stdout.splitlines()[-2:] == ["exit 0", "loaded []"], result.stdout + result.stderr
    assert sum(line.startswith("ingested  ") for line in result.stdout.splitlines()) == 2


def test_rejected_file_gives_exit_1_and_shows_in_status(tmp_path: Path, drops: Path) -> None:
    bad = write_delivery(
        drops / "bad.csv", [MEASUREMENTS_HEADER, "1,a,2024-01-01T00:00:00Z,60,1,s,1,230,x,1,3"]
    )
    result = meterdrop("ingest", "--db", str(tmp_path / "x.duckdb"), str(drops))
    assert result.returncode == 1
    assert f"rejected  {bad}: line 2: power(W) value 'x' is not a number" in result.stdout
    status = meterdrop("status", "--db", str(tmp_path / "x.duckdb"))
    assert status.returncode == 0, status.stderr
    assert f"{bad} │ line 2: power(W) value 'x' is not a number" in status.stdout
    assert "pulse_meter_measurements" in status.stdout and "rejected" in status.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ingest", "/no/such/file.csv"], "does not exist"),
        (["ingest"], "Missing argument"),
        (["query", "--db", "/no/such.duckdb", "SELECT 1"], "no database at /no/such.duckdb"),
        (["status", "--db", "/no/such.duckdb"], "no database at /no/such.duckdb"),
        (["query", "--format", "xml", "SELECT 1"], "Invalid value for '--format'"),
    ],
)
def test_usage_errors_exit_2_and_say_what_to_do(args: list[str], message: str) -> None:
    result = meterdrop(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_bad_sql_is_a_clear_error(tmp_path: Path, drops: Path) -> None:
    meterdrop("ingest", "--db", str(tmp_path / "x.duckdb"), str(drops))
    result = meterdrop("query", "--db", str(tmp_path / "x.duckdb"), "SELECT nope FROM files")
    assert result.returncode == 1
    assert 'Referenced column "nope" not found' in result.stderr


def test_data_dir_comes_from_the_environment(tmp_path: Path, drops: Path) -> None:
    env_dir = tmp_path / "from-env"
    result = subprocess.run([sys.executable, "-m", "meterdrop", "ingest", str(drops)], capture_output=True,
                            text=True, env={**__import__("os").environ, "METERDROP_DATA_DIR": str(env_dir)},
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (env_dir / "meterdrop.duckdb").exists()


def test_every_green_button_sample_ingests(tmp_path: Path) -> None:
    samples = sorted((SHARED / "samples" / "greenbutton").glob("*.[xc][ms][lv]"))
    assert len(samples) == 8
    result = meterdrop("ingest", "--db", str(tmp_path / "gb.duckdb"), *map(str, samples))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ingested  ") == 8
    zones = meterdrop("query", "--db", str(tmp_path / "gb.duckdb"), "--format", "csv",
                      "SELECT format, timezone FROM files WHERE format = 'greenbutton_csv'")  # fmt: skip
    assert zones.stdout.splitlines() == ["format,timezone", "greenbutton_csv,America/Los_Angeles"]


def test_timezone_option_is_checked_and_recorded(tmp_path: Path) -> None:
    csv_file = write_delivery(tmp_path / "usage.csv", [
        "Name,JANE DOE", "Address,1 MAIN ST", "Account Number,1234", "Service,Service 1", "",
        "TYPE,DATE,START TIME,END TIME,USAGE (kWh),NOTES",
        "Electric usage,2025-01-15,00:00,00:59,1.5,",
    ])  # fmt: skip
    bad = meterdrop("ingest", "--db", str(tmp_path / "t.duckdb"), "--timezone", "Mars/Olympus", str(csv_file))
    assert bad.returncode == 2
    assert "'Mars/Olympus' is not an IANA time zone" in bad.stderr
    good = meterdrop(
        "ingest", "--db", str(tmp_path / "t.duckdb"), "--timezone", "America/New_York", str(csv_file)
    )
    assert good.returncode == 0, good.stdout + good.stderr
    got = meterdrop("query", "--db", str(tmp_path / "t.duckdb"), "--format", "csv",
                    "SELECT f.timezone, i.interval_start, i.duration_s, i.value FROM greenbutton_intervals i "
                    "JOIN files f ON f.id = i.file_id")  # fmt: skip
    assert got.stdout.splitlines()[1] == "America/New_York,2025-01-15T05:00:00+00:00,3600,1500.0"


def test_max_file_size_refuses_larger_files_with_a_reason(tmp_path: Path, drops: Path) -> None:
    big = drops / "Measurements" / "a.csv"
    result = meterdrop("ingest", "--db", str(tmp_path / "x.duckdb"), "--max-file-size", "100", str(big))
    assert result.returncode == 1
    assert (
        f"rejected  {big}: file of {big.stat().st_size:,} bytes is over the 100-byte limit" in result.stdout
    )
    bad = meterdrop("ingest", "--db", str(tmp_path / "x.duckdb"), "--max-file-size", "lots", str(big))
    assert bad.returncode == 2 and "'lots' is not a size like 500M or 2G" in bad.stderr


@pytest.fixture(params=["tmpfs", "injected"])
def full_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, Callable[[], None]]]:
    """A database folder on a disk with no room left, and how to make room.

    ``tmpfs``: a real 16 MB file system filled by a filler file (where mounting is refused,
    the ``injected`` way instead). ``injected``: DuckDB's commit fails as it does on a full
    disk, through a site hook that only the subprocess loads.
    """
    folder = tmp_path / "small"
    folder.mkdir()
    if request.param == "tmpfs" and mount_tmpfs(folder, 16 * 1024 * 1024):
        try:
            result = meterdrop("ingest", "--db", str(folder / "m.duckdb"), str(_small_delivery(tmp_path)))
            assert result.returncode == 0, result.stderr
            stat = os.statvfs(folder)
            filler = folder / "filler"
            filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 300_000))
            yield folder, filler.unlink
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    hook = tmp_path / "hook"
    hook.mkdir()
    flag = tmp_path / "disk-full"
    flag.touch()
    (hook / "sitecustomize.py").write_text(
        "import os, duckdb, processor.store as s\n"
        "real = s.Store.record\n"
        "def record(self, *a, **k):\n"
        f"    if os.path.exists({str(flag)!r}):\n"
        "        raise duckdb.IOException('Could not write file \"m.duckdb.wal\": No space left on device')\n"
        "    return real(self, *a, **k)\n"
        "s.Store.record = record\n"
    )
    os.environ["PYTHONPATH"] = f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    try:
        yield folder, flag.unlink
    finally:
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]


def _small_delivery(folder: Path) -> Path:
    path = folder / "first.csv"
    write_delivery(path, [MEASUREMENTS_HEADER, "1,Chiller,2024-01-01T00:00:00Z,60,7,HQ,1,230,230,1,230"],
                   at("2024-01-01 01:00"))  # fmt: skip
    return path


def test_a_full_disk_stops_ingest_with_a_clear_error_and_loses_nothing(
    tmp_path: Path, full_disk: tuple[Path, Callable[[], None]]
) -> None:
    folder, make_room = full_disk
    delivery = tmp_path / "big.csv"
    write_delivery(delivery, [MEASUREMENTS_HEADER] + [
        f"{d},Dev {d},2024-01-02T{h:02d}:{m:02d}:00Z,15,7,HQ,1.5,230.1,{d / 10:.2f},0.9,{h * m * 0.3:.3f}"
        for d in range(300) for h in range(24) for m in (0, 15, 30, 45)
    ], at("2024-01-03 01:00"))  # fmt: skip
    database = folder / "m.duckdb"
    result = meterdrop("ingest", "--db", str(database), str(delivery))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"stopped at {delivery}" in result.stderr and "No space left on device" in result.stderr
    assert "run the same command again" in result.stderr
    make_room()
    result = meterdrop("ingest", "--db", str(database), str(delivery))
    assert result.returncode == 0, result.stderr
    counts = meterdrop("query", "--db", str(database), "--format", "csv",
                       "SELECT count(*) AS n, count(DISTINCT file_id) AS f FROM panoramic_measurements "
                       "WHERE measurement_time >= '2024-01-02'")  # fmt: skip
    assert counts.returncode == 0, counts.stderr
    assert counts.stdout.splitlines()[1:] == ["28800,1"]


def test_outcome_lines_read_the_same_on_a_terminal_and_in_a_log() -> None:
    """A terminal gets rich markup (colours), a log plain text: once rendered, the same words,
    brackets in paths and reasons included."""
    from rich.console import Console

    from meterdrop.cli import _outcome_lines
    from processor.ingest import Outcome

    archive = Outcome(
        "drop/[2024] export.zip", "ingested", "zip", 3, "1 member ignored",
        members=(
            Outcome("drop/[2024] export.zip!a.csv", "ingested", "panoramic_measurements", 3),
            Outcome("drop/[2024] export.zip!b.txt", "rejected", detail="unrecognised format: CSV header [a, b]"),
            Outcome("drop/[2024] export.zip!c.csv", "duplicate", "panoramic_measurements", 0, "same as #1"),
        ),
    )  # fmt: skip
    plain = [line for _, line in _outcome_lines(archive, styled=False)]
    rendered = io.StringIO()
    console = Console(file=rendered, highlight=False, soft_wrap=True, color_system=None)
    for _, line in _outcome_lines(archive, styled=True):
        console.print(line)
    assert rendered.getvalue().splitlines() == plain
    assert plain[2] == "  rejected  drop/[2024] export.zip!b.txt: unrecognised format: CSV header [a, b]"


def _without_root_powers() -> list[str]:
    """A command prefix under which file permissions hold: root keeps its uid, loses its override."""
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []


def test_a_db_that_is_not_a_database_is_refused_not_written_past(tmp_path: Path, drops: Path) -> None:
    """DuckDB opens an existing CSV as an in-memory database: an ingest once said ok and stored nothing."""
    exports = tmp_path / "exports.csv"
    exports.write_text(MEASUREMENTS_HEADER + "\n")
    before = exports.read_bytes()
    for args in (["ingest", "--db", str(exports), str(drops)], ["status", "--db", str(exports)],
                 ["query", "--db", str(exports), "SELECT 1"], ["check", "--db", str(exports)]):  # fmt: skip
        result = meterdrop(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert f"{exports} is not a DuckDB database" in result.stderr
        assert "Traceback" not in result.stderr
    assert exports.read_bytes() == before
    served = meterdrop("serve", "--data-dir", str(tmp_path / "data"), "--db", str(exports), "--host", "127.0.0.1",
                       "--sftp-port", "0", "--ftps-port", "0", "--passive-ports", "47000-47001")  # fmt: skip
    assert (
        served.returncode == 1
        and "cannot start:" in served.stderr
        and "not a DuckDB database" in served.stderr
    )


def test_only_a_lock_is_blamed_on_another_process(tmp_path: Path) -> None:
    empty = tmp_path / "empty.duckdb"
    empty.touch()
    result = meterdrop("query", "--db", str(empty), "SELECT 1")
    assert result.returncode == 1
    assert f"cannot open {empty}" in result.stderr and "not a valid DuckDB database" in result.stderr
    assert "Another process" not in result.stderr


def test_a_database_folder_that_cannot_be_made_is_a_clear_error(tmp_path: Path, drops: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = meterdrop("ingest", "--db", str(blocker / "x.duckdb"), str(drops))
    assert result.returncode == 1
    assert f"cannot create the folder {blocker} for the database" in result.stderr
    assert "Traceback" not in result.stderr


def test_query_prints_every_duckdb_type_as_json_and_csv_can_hold_it(tmp_path: Path, drops: Path) -> None:
    db = tmp_path / "x.duckdb"
    meterdrop("ingest", "--db", str(db), str(drops))
    sql = (
        "SELECT INTERVAL 90 MINUTE AS span, TIME '10:30:00' AS at, "
        "'00000000-0000-0000-0000-00000000002a'::UUID AS id, 'nan'::DOUBLE AS nan, 'inf'::DOUBLE AS inf, "
        "list(measurement_time) AS times, {'n': 1, 'd': DATE '2024-01-02'} AS s FROM panoramic_measurements"
    )
    result = meterdrop("query", "--db", str(db), "--format", "json", sql)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {"span": "PT5400S", "at": "10:30:00", "id": "00000000-0000-0000-0000-00000000002a", "nan": None,
         "inf": None, "times": ["2024-01-01T00:00:00+00:00"], "s": {"n": 1, "d": "2024-01-02"}}
    ]  # fmt: skip
    as_csv = meterdrop("query", "--db", str(db), "--format", "csv", sql)
    assert as_csv.returncode == 0, as_csv.stderr
    header, line = csv.reader(io.StringIO(as_csv.stdout))
    assert dict(zip(header, line, strict=True))["times"] == '["2024-01-01T00:00:00+00:00"]'


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "--rejects", "-1"], "Invalid value for '--rejects'"),
        (["ingest", "--max-file-size", "-5", "x.csv"], "a size must be above zero"),
        (["ingest", "--max-file-size", "0", "x.csv"], "a size must be above zero"),
        (["serve", "--max-upload-size", "-1K"], "a size must be above zero"),
    ],
)
def test_values_out_of_range_are_usage_errors(args: list[str], message: str) -> None:
    result = meterdrop(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_an_unreadable_folder_is_reported_not_skipped(tmp_path: Path, drops: Path) -> None:
    locked = drops / "Locked"
    write_delivery(
        locked / "c.csv", [MEASUREMENTS_HEADER, "2,Pump,2024-01-01T00:00:00Z,60,7,HQ,1,230,230,1,5"]
    )
    locked.chmod(0)
    try:
        result = subprocess.run(
            [*_without_root_powers(), sys.executable, "-m", "meterdrop", "ingest", "--db",
             str(tmp_path / "x.duckdb"), str(drops)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    finally:
        locked.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert f"rejected  {locked}: cannot list this folder (Permission denied)" in result.stdout
    assert "1 folder(s) unreadable, 1 rejected" in result.stderr
    assert result.stdout.count("ingested  ") == 2  # the readable files still went in


def test_users_in_a_data_dir_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o555)
    try:
        result = subprocess.run(
            [*_without_root_powers(), sys.executable, "-m", "meterdrop", "users", "add", "acme", "--password-stdin",
             "--data-dir", str(data)],
            input="a long passphrase\n", capture_output=True, text=True, check=False,
        )  # fmt: skip
    finally:
        data.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert f"cannot write the users of {data}: Permission denied" in result.stderr
    assert "Traceback" not in result.stderr


def test_query_runs_statements_in_order_and_prints_the_last(tmp_path: Path, drops: Path) -> None:
    db = tmp_path / "x.duckdb"
    meterdrop("ingest", "--db", str(db), str(drops))
    result = meterdrop("query", "--db", str(db), "--format", "json",
                       "SET TimeZone = 'Europe/Berlin'; SELECT min(measurement_time) AS t FROM panoramic_measurements")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"t": "2024-01-01T01:00:00+01:00"}]
