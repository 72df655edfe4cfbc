"""kill -9 of `meterdrop serve` at random moments, under uploads: the short version of
bench/chaos_kill.py (which runs 200 kills; see its docstring for what is checked).

Ten kills while SFTP and FTPS clients stream overlapping Panoramic exports and cut
some uploads off: afterwards every upload the clients saw complete is ingested exactly
once, none they did not finish is, `meterdrop check` passes, and the table is the
deliveries applied in delivery order.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench" / "chaos_kill.py"


def chaos_kill() -> ModuleType:
    """bench/ is not a package: load the script as a module (registered, for its dataclasses)."""
    spec = importlib.util.spec_from_file_location("chaos_kill", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos_kill"] = module
    spec.loader.exec_module(module)
    return module


def test_kill_9_at_random_moments_loses_nothing_and_ingests_each_upload_once(tmp_path: Path) -> None:
    chaos = chaos_kill()
    config = chaos.ChaosConfig(kills=10, minutes=2.0, max_delay=1.2, seed=20261122, workdir=tmp_path / "chaos",
                               drain_timeout=120.0)  # fmt: skip
    result = chaos.run(config, say=lambda text: None)
    summary = chaos.report(config, result)
    assert result.problems == [], summary
    assert result.kills == 10, summary  # all of them within the 2 minutes
    uploads = result.uploads
    # the run exercised what it is meant to: completed and deliberately cut uploads on both protocols
    assert uploads["completed"] >= 20 and uploads["interrupted"] >= 1, summary
    for protocol in ("sftp", "ftps"):
        assert result.by_protocol[protocol]["completed"] >= 5, summary
    assert result.files_ingested == uploads["completed"] + result.unsure_ingested, summary
    assert result.files_rejected == 0 and result.files_duplicate == 0, summary
    assert result.check.startswith(
        f"ok: {result.files_ingested} file(s) ({result.files_ingested} ingested)"
    ), summary
