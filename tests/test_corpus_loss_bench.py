"""benchmarks/corpus_loss.py (issue 32, item 5): the rehearsal runs every mode end to end in seconds,
and a size that cannot fit is refused with the measured figure it was predicted from."""

import importlib.util
import json
import types
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    """2,000 and 8,000 passages run in every mode; with 0.1 GB available, 3,000,000 (0.19 GB of vectors
    at D=16) are refused in every mode, the reason naming the size and the peak measured at N=8,000."""
    result, md = _run(tmp_path, "--ns", "2000", "8000", "3000000", "--available-gb", "0.1", "--headroom-gb", "0")
    *measured, big = result["rows"]
    assert [r["n"] for r in measured] == [2_000, 8_000]
    for row in measured:
        assert set(row["modes"]) == {"corpus", "topk", "corpus-chunked", "corpus-online", "topk-chunked"} and not row["skipped"]
        assert row["corpus_rss_bytes"] >= 0 and row["vector_bytes"] == row["n"] * 16 * 4
        for m in row["modes"].values():
            assert len(m["ms"]) == len(m["cpu_ms"]) == 2 and all(t > 0 for t in m["ms"] + m["cpu_ms"])
            assert m["peak_extra_bytes"] >= 0 and m["loss"] > 0
    lines = [line for line in md.splitlines() if re.match(r"\| [\d,]+ \|", line)]
    assert len(lines) == 15
    for line in lines[:10]:
        ms = line.split("|")[4]
        assert re.fullmatch(r" [\d,.]+ \([\d,.]+-[\d,.]+\) ", ms), line
    assert not big["modes"] and set(big["skipped"]) == {"corpus", "topk", "corpus-chunked", "corpus-online", "topk-chunked"}
    assert "0.2 GB of vectors" in big["skipped"]["corpus"] and "measured at N=8,000 is" in big["skipped"]["corpus"]
    assert lines[10].startswith("| 3,000,000 | 0.19 | corpus (exact NLL over all N) | not run: needs about")


def test_predicted_need_scales_the_measured_peak_per_pair():
    bench = _bench()
    done = [{"n": 1_000, "batch": 4, "modes": {"corpus": {"peak_extra_bytes": 80_000}, "corpus-chunked": {"peak_extra_bytes": 4_000}}}]
    need, basis = bench.predict_need(10_000, 8, 16, done, "corpus")  # 20 bytes per pair -> 20 * 8 * 10k, plus vectors and groups
    assert need == 10_000 * 16 * 4 + 10_000 * 8 + 20 * 8 * 10_000
    assert "20.0 bytes per (question, passage) pair" in basis and "N=1,000" in basis
    for proposal in ("corpus-chunked", "corpus-online", "topk-chunked"):  # a chunk's tensors do not grow with N
        need, _ = bench.predict_need(10_000, 8, 16, [{**done[0], "modes": {proposal: {"peak_extra_bytes": 4_000}}}], proposal)
        assert need == 10_000 * 16 * 4 + 10_000 * 8 + 5_000


def _case(n=50, dim=8, seed=0):
    """A corpus with copies (rows 3, 17 and 40 share content; so do 5 and 6) and questions with several
    known positives, one of them a copy's group, and embeddings near their positives."""
    from trainer.query_side import IndexedCorpus

    g = torch.Generator().manual_seed(seed)
    vectors = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    content = torch.arange(n)
    content[[17, 40]] = 3
    content[6] = 5
    corpus = IndexedCorpus(None, None, vectors, range(n), {}, content, True)
    positive_rows = torch.tensor([3, 9, 21, 5])
    known_rows = torch.tensor([[3, 30, -1], [9, -1, -1], [21, 22, 23], [5, 11, -1]])
    q = torch.nn.functional.normalize(vectors[positive_rows] + 0.3 * torch.randn(4, dim, generator=g), dim=1)
    return corpus, positive_rows, known_rows, q


@pytest.mark.parametrize("proposal", ["chunked_corpus_nll", "online_corpus_nll"])
@pytest.mark.parametrize("chunk", [1, 7, 50, 64])
def test_the_chunked_corpus_proposals_equal_the_projects_corpus_loss(chunk, proposal):
    """Value and gradient equal query_side_loss(mode="corpus") (in_batch_nll over every passage), for
    chunks that divide N or not, chunks wholly masked (chunk 1), and one chunk for all."""
    from dpr_service.core.config import EncoderConfig
    from trainer.distributed import Dist
    from trainer.query_side import QueryBatch, query_side_loss

    bench = _bench()
    corpus, positive_rows, known_rows, q = _case()
    encoder = types.SimpleNamespace(config=EncoderConfig(pooling="mean", similarity="cosine", temperature=0.05))
    q1, q2 = q.clone().requires_grad_(True), q.clone().requires_grad_(True)
    want, _ = query_side_loss(encoder, q1, QueryBatch({}, positive_rows, known_rows), corpus, Dist(), "corpus", 4, 0.95)
    want.backward()
    got = getattr(bench, proposal)(q2, corpus, positive_rows, known_rows, 0.05, chunk)
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(q2.grad, q1.grad)


@pytest.mark.parametrize("chunk", [1, 7, 50])
@pytest.mark.parametrize("ratio", [0.95, None])
def test_the_chunked_search_proposal_finds_the_projects_negatives(chunk, ratio):
    from trainer.query_side import index_negatives

    bench = _bench()
    corpus, positive_rows, known_rows, q = _case()
    for k in (1, 5, 60):
        want = index_negatives(q, corpus, positive_rows, known_rows, k, ratio)
        got = bench.chunked_index_negatives(q, corpus, positive_rows, known_rows, k, ratio, chunk)
        assert torch.equal(got, want), (k, got, want)
