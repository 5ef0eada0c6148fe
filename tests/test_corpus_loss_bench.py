"""benchmarks/corpus_loss.py (issue 32, item 5): the rehearsal runs every mode end to end in seconds,
and a size that cannot fit is refused with the measured figure it was predicted from."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("corpus_loss", ROOT / "benchmarks" / "corpus_loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, *extra):
    done = subprocess.run([sys.executable, "benchmarks/corpus_loss.py", "--rehearse", "--out", str(tmp_path), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((tmp_path / "result.json").read_text()), (tmp_path / "result.md").read_text()


def test_rehearsal_measures_every_size_and_mode_and_refuses_what_cannot_fit(tmp_path):
    """2,000 and 8,000 passages run in both modes; with 0.1 GB available, 3,000,000 (0.19 GB of vectors
    at D=16) are refused, the reason naming the size and the per-pair peak measured at N=8,000."""
    result, md = _run(tmp_path, "--ns", "2000", "8000", "3000000", "--available-gb", "0.1", "--headroom-gb", "0")
    *measured, big = result["rows"]
    assert [r["n"] for r in measured] == [2_000, 8_000]
    for row in measured:
        assert set(row["modes"]) == {"corpus", "topk"}
        assert row["corpus_rss_bytes"] >= 0 and row["vector_bytes"] == row["n"] * 16 * 4
        for m in row["modes"].values():
            assert len(m["ms"]) == len(m["cpu_ms"]) == 2 and all(t > 0 for t in m["ms"] + m["cpu_ms"])
            assert m["peak_extra_bytes"] >= 0 and m["loss"] > 0
    lines = [line for line in md.splitlines() if re.match(r"\| [\d,]+ \|", line)]
    assert len(lines) == 5
    for line in lines[:4]:
        ms = line.split("|")[4]
        assert re.fullmatch(r" [\d,.]+ \([\d,.]+-[\d,.]+\) ", ms), line
    assert "modes" not in big
    assert "0.2 GB of vectors" in big["skipped"] and "measured at N=8,000" in big["skipped"]
    assert lines[4].startswith("| 3,000,000 | 0.19 | - | not run: needs about")


def test_predicted_need_scales_the_measured_peak_per_pair():
    bench = _bench()
    done = [{"n": 1_000, "batch": 4, "modes": {"corpus": {"peak_extra_bytes": 80_000}, "topk": {"peak_extra_bytes": 4_000}}}]
    need, basis = bench.predict_need(10_000, 8, 16, done)  # 20 bytes per pair -> 20 * 8 * 10k, plus vectors and groups
    assert need == 10_000 * 16 * 4 + 10_000 * 8 + 20 * 8 * 10_000
    assert "20.0 bytes per (question, passage) pair" in basis and "N=1,000" in basis
