"""Long fuzzing sessions for every parser, with the same inputs and oracle as the CI tests.

    ./run python bench/fuzz_parsers.py --minutes 10 --parser espi_xml
    ./run python bench/fuzz_parsers.py --minutes 10 --all          # one parser after another
    ./run python bench/fuzz_parsers.py --minutes 1 --all --engine hypothesis

Parsers: panoramic (Measurements / PAN-42 / Pulse Meter CSVs), catalog, utility_csv (PG&E and
the other utility downloads), espi_xml (Green Button XML), zip (ZIPs of all of them).

Engines: ``atheris`` (libFuzzer, coverage-guided over the processor package, with the
structural mutations of tests/processor/fuzzing.py as its custom mutator, mixed with
libFuzzer's own byte mutations) when it is installed, else ``hypothesis`` (the CI
strategies with an unbounded number of examples). Each parser runs in a worker process
of its own, so that libFuzzer's exit (or a crash in native code) ends only that parser.

Every input goes through the real Ingester into a DuckDB file and is judged by
``fuzzing.Oracle``: no exception escapes, each file ends ingested / duplicate / rejected
(with a reason), one ledger row per file, nothing of a rejected file in any reading table,
and at most ``1 s + 1 s per MB`` (an input over that is run again on a fresh database, and
counts as a hang only if it is slow again). The worker records inputs tried, outcomes,
crashes, known defects outside the parsers, hangs, the slowest input and the slowest
seconds per MB, and its peak RSS; failing inputs are saved under ``--out``.
Prints a summary and never asserts: the exit status is 1 when any parser had a crash or
hang that is not a known defect, else 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

PARSERS = ("panoramic", "catalog", "utility_csv", "espi_xml", "zip")
MB = 1024 * 1024
STORE_INPUTS = 2000  # inputs per database before a fresh one (keeps the oracle's scans small)
STATS_EVERY_S = 10.0
MAX_LEN = 2 * MB  # the largest sample is 1.07 MB


def engine_available() -> str:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return "hypothesis"
    return "atheris"


# -- statistics ----------------------------------------------------------------------------------
@dataclass
class Stats:
    """What one worker saw; written as JSON while it runs, so a killed worker still reports."""

    parser: str
    engine: str
    minutes: float
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    tried: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    crashes: int = 0  # unknown: an exception escaped, or the oracle failed
    known: dict[str, int] = field(default_factory=dict)  # fuzzing.KNOWN_DEFECTS outside the parsers
    hangs: int = 0  # over budget twice
    slow_once: int = 0  # over budget once, within it on the re-run (machine noise)
    slowest_s: float = 0.0
    slowest_bytes: int = 0
    max_s_per_mb: float = 0.0  # among inputs of 64 KiB or more, where per-file costs do not dominate
    max_s_per_mb_bytes: int = 0
    max_budget_used: float = 0.0  # the largest fraction of its time budget any input used
    total_bytes: int = 0
    largest_bytes: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_mib: float = 0.0
    rss_jumps: list[dict[str, Any]] = field(default_factory=list)  # inputs that raised the peak by > 64 MiB
    finished: bool = False

    def add(self, result: Any, data: bytes, saved: Path | None, *, hang: bool = False) -> None:
        self.tried += 1
        self.statuses[result.status] = self.statuses.get(result.status, 0) + 1
        size = len(data)
        self.total_bytes += size
        self.largest_bytes = max(self.largest_bytes, size)
        self.max_budget_used = max(self.max_budget_used, result.seconds / result.budget)
        if result.seconds > self.slowest_s:
            self.slowest_s, self.slowest_bytes = result.seconds, size
        if size >= 64 * 1024 and result.seconds / (size / MB) > self.max_s_per_mb:
            self.max_s_per_mb, self.max_s_per_mb_bytes = result.seconds / (size / MB), size
        if result.status == "rejected":
            from tests.processor.fuzzing import reason_kind

            kind = reason_kind(result.detail)
            self.reasons[kind] = self.reasons.get(kind, 0) + 1
        if result.failed:
            if result.known:
                self.known[result.known] = self.known.get(result.known, 0) + 1
            else:
                self.crashes += 1
        # Every unknown failure is listed; known ones only until 20 are (their inputs are all saved).
        listed = sum(1 for f in self.failures if f["known"])
        if (result.failed or hang) and saved is not None and (not result.known or listed < 20):
            self.failures.append({
                    "known": result.known, "status": "hang" if hang else result.status,
                    "seconds": round(result.seconds, 3), "detail": (result.detail or "")[:300],
                    "problems": [p[-1500:] for p in result.problems[:3]], "input": str(saved),
                })  # fmt: skip

    def write(self, path: Path, *, finished: bool = False) -> None:
        self.seconds = time.time() - self.started
        self.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.finished = finished
        self.reasons = dict(collections.Counter(self.reasons).most_common(40))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)


# -- the worker ------------------------------------------------------------------------------------
class Session:
    """Inputs through a Harness, judged, counted; the store is renewed every STORE_INPUTS inputs."""

    def __init__(self, parser: str, engine: str, minutes: float, out: Path) -> None:
        from tests.processor import fuzzing

        self.fuzzing = fuzzing
        self.parser = parser
        self.suffix = fuzzing.suffix_for(parser)
        self.out = out / parser
        self.failures = self.out / "failures"
        self.failures.mkdir(parents=True, exist_ok=True)
        self.stats_path = self.out / "stats.json"
        self.stats = Stats(parser, engine, minutes)
        self.deadline = time.monotonic() + minutes * 60
        self.generation = 0
        self.harness = self._new_harness()
        self.last_write = time.monotonic()

    def _new_harness(self) -> Any:
        self.generation += 1
        scratch = self.out / f"store-{self.generation}"
        shutil.rmtree(scratch, ignore_errors=True)
        return self.fuzzing.Harness(scratch)

    def time_left(self) -> bool:
        return time.monotonic() < self.deadline

    def run(self, data: bytes) -> None:
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = self.harness.run(data, self.suffix)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        if grown > 64 and len(self.stats.rss_jumps) < 20:  # which inputs raise the peak, and by how much
            saved_as = self.failures / f"rss-{self.stats.tried:07d}{self.suffix}"
            saved_as.write_bytes(data)
            self.stats.rss_jumps.append({
                "mib": round(grown), "bytes": len(data), "status": result.status,
                "detail": (result.detail or "")[:200], "input": str(saved_as),
            })  # fmt: skip
        hang = False
        if result.over_budget:
            hang = self.harness.confirm_slow(data, self.suffix)
            if hang:
                self.stats.hangs += 1
            else:
                self.stats.slow_once += 1
        saved = None
        if result.failed or hang:
            saved = self.failures / f"{self.stats.tried:07d}{self.suffix}"
            saved.write_bytes(data)
        self.stats.add(result, data, saved, hang=hang)
        if self.harness.count >= STORE_INPUTS:
            old = self.harness
            self.harness = self._new_harness()
            old.close()
            shutil.rmtree(old.directory, ignore_errors=True)
        if time.monotonic() - self.last_write > STATS_EVERY_S:
            self.stats.write(self.stats_path)
            self.last_write = time.monotonic()

    def finish(self) -> None:
        self.stats.write(self.stats_path, finished=True)
        self.harness.close()
        shutil.rmtree(self.harness.directory, ignore_errors=True)


def run_hypothesis(parser: str, minutes: float, out: Path) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    session = Session(parser, "hypothesis", minutes, out)
    fuzzing = session.fuzzing

    @settings(max_examples=500, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.data())
    def batch(data: st.DataObject) -> None:
        payload = fuzzing.hostile_input(parser, fuzzing.Choices(draw=data.draw))  # drawn whatever the time,
        if session.time_left():  # or hypothesis sees generation change between examples
            session.run(payload)

    while session.time_left():
        batch()
    session.finish()


def run_atheris(parser: str, minutes: float, out: Path) -> None:
    import atheris

    # Coverage feedback from our own code: everything in the processor package is instrumented.
    with atheris.instrument_imports(include=["processor"]):
        import processor.catalog
        import processor.csvfile
        import processor.greenbutton.espi
        import processor.greenbutton.utility_csv
        import processor.headers
        import processor.ingest
        import processor.panoramic
        import processor.store  # noqa: F401

    session = Session(parser, "atheris", minutes, out)
    fuzzing = session.fuzzing
    corpus = session.out / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir(parents=True)
    for index, seed in enumerate(fuzzing.seeds(parser, 60)):
        (corpus / f"seed-{index:03d}").write_bytes(seed[:MAX_LEN])

    def test_one(data: bytes) -> None:
        if not session.time_left():
            session.finish()
            os._exit(0)  # libFuzzer has no clean way back to Python
        session.run(data)

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        """Half libFuzzer's byte mutations, half the structural ones the CI tests use."""
        rng = random.Random(seed)
        if rng.random() < 0.4:
            return atheris.Mutate(data, max_size)
        choices = fuzzing.Choices(rng)
        try:
            for _ in range(rng.randint(1, 3)):
                data = fuzzing.mutate(parser, choices, data, max_size)
        except Exception:  # a mutator bug must not end the session: fall back to bytes
            return atheris.Mutate(data, max_size)
        return data[:max_size]

    atheris.Setup(
        [sys.argv[0], str(corpus), f"-max_len={MAX_LEN}", "-timeout=120", "-rss_limit_mb=4096",
         f"-max_total_time={int(minutes * 60) + 120}", f"-artifact_prefix={session.out}/", "-print_final_stats=1"],
        test_one, custom_mutator=mutator,
    )  # fmt: skip
    atheris.Fuzz()
    session.finish()  # reached only if libFuzzer returns (it normally exits)


# -- the parent -------------------------------------------------------------------------------------
def machine() -> str:
    load = os.getloadavg()[0]
    mem = ""
    try:
        import psutil

        mem = f"   memory: {psutil.virtual_memory().total / 1024**3:.1f} GiB"
    except ImportError:
        pass
    return (
        f"nproc: {os.cpu_count()}{mem}   load(1 min): {load:.2f}\n"
        f"python {platform.python_version()}   {platform.platform()}"
    )


def run_parser(parser: str, minutes: float, engine: str, out: Path) -> dict[str, Any]:
    """Run one worker to its end; its stats, or what is known if it died."""
    stats_path = out / parser / "stats.json"
    stats_path.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--worker", parser, "--minutes", str(minutes), "--engine", engine,
               "--out", str(out)]  # fmt: skip
    log = out / parser / "worker.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {parser}: {engine} for {minutes:g} min (log {log})", flush=True)
    with log.open("wb") as sink:
        code = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=False,
                              timeout=minutes * 60 + 900).returncode  # fmt: skip
    stats: dict[str, Any] = json.loads(stats_path.read_text()) if stats_path.exists() else {"parser": parser}
    stats["exit_code"] = code
    if not stats.get("finished"):
        tail = log.read_bytes()[-2000:].decode(errors="replace")
        stats["died"] = tail
        stats["crashes"] = stats.get("crashes", 0) + 1
    return stats


def summary(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'parser':<12} {'engine':<10} {'min':>5} {'tried':>7} {'ingested':>8} {'rejected':>8} {'dup':>5} "
        f"{'crashes':>7} {'known':>6} {'hangs':>5} {'slow1x':>6} {'slowest s':>9} {'(bytes)':>10} "
        f"{'max s/MB':>8} {'budget':>6} {'RSS MiB':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        st = r.get("statuses", {})
        lines.append(
            f"{r['parser']:<12} {r.get('engine', '?'):<10} {r.get('seconds', 0) / 60:>5.1f} {r.get('tried', 0):>7} "
            f"{st.get('ingested', 0):>8} {st.get('rejected', 0):>8} {st.get('duplicate', 0):>5} "
            f"{r.get('crashes', 0):>7} {sum(r.get('known', {}).values()):>6} {r.get('hangs', 0):>5} "
            f"{r.get('slow_once', 0):>6} {r.get('slowest_s', 0):>9.3f} {r.get('slowest_bytes', 0):>10,} "
            f"{r.get('max_s_per_mb', 0):>8.3f} {r.get('max_budget_used', 0):>6.0%} {r.get('peak_rss_mib', 0):>7.0f}"
        )
    for r in results:
        if r.get("known"):
            lines.append(f"{r['parser']}: known defects outside the parsers: {r['known']}")
        if r.get("died"):
            lines.append(f"{r['parser']}: worker died (exit {r.get('exit_code')}):\n{r['died']}")
        for failure in r.get("failures", [])[:5]:
            if not failure.get("known"):
                lines.append(
                    f"{r['parser']}: FAILURE {failure['status']}: {failure['detail']} ({failure['input']})"
                )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="per parser (default 10)")
    parser.add_argument("--parser", action="append", choices=PARSERS, help="repeatable")
    parser.add_argument("--all", action="store_true", help="every parser, one after another")
    parser.add_argument("--engine", choices=("atheris", "hypothesis"), default=None,
                        help="default: atheris when installed, else hypothesis")  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=HERE / "out" / "fuzz", help="work files and failing inputs"
    )
    parser.add_argument("--worker", choices=PARSERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    engine = args.engine or engine_available()
    out: Path = args.out.resolve()
    if args.worker:
        (run_atheris if engine == "atheris" else run_hypothesis)(args.worker, args.minutes, out)
        return 0
    parsers = list(PARSERS) if args.all else (args.parser or [])
    if not parsers:
        parser.error("name a --parser or give --all")
    print(machine(), flush=True)
    print(f"command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}   engine: {engine}", flush=True)
    results = []
    for name in parsers:
        results.append(run_parser(name, args.minutes, engine, out))
        print(summary(results[-1:]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n" + summary(results))
    print(f"load(1 min) at the end: {os.getloadavg()[0]:.2f}")
    bad = any(r.get("crashes") or r.get("hangs") for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
