"""The Makefile's promises (issue 14.14): make demo reuses a trained demo whose inputs are unchanged,
make serve restarts the server alone, make test says how long it takes. Checked with `make -n`."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(*args) -> str:
    # -o: never remake the virtualenv here (the dry run is about the demo's own inputs)
    return subprocess.run(["make", "-n", "-o", ".venv/.installed", "-o", "setup", *args], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


def test_demo_trains_once_then_reuses_the_trained_demo(tmp_path):
    demo = tmp_path / "demo"
    assert "dpr train" in dry_run("demo-build", f"DEMO={demo}")
    demo.mkdir()
    (demo / ".built").touch()
    later = time.time() + 5
    os.utime(demo / ".built", (later, later))  # newer than every input
    reused = dry_run("demo-build", f"DEMO={demo}")
    assert "dpr train" not in reused and "dpr eval" in reused
    config = ROOT / "trainer" / "demo.yaml"
    before = config.stat()
    os.utime(config, (later + 5, later + 5))  # an input changed: train again
    try:
        assert "dpr train" in dry_run("demo-build", f"DEMO={demo}")
    finally:  # only the time changed; the file's content (committed or not) is left alone
        os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_serve_restarts_the_server_alone_and_test_says_how_long(tmp_path):
    serve = dry_run("serve", f"DEMO={tmp_path}")
    assert "dpr serve" in serve and "dpr train" not in serve
    assert "about 15-20 minutes" in dry_run("test")
