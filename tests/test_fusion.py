"""Hybrid retrieval: fusions against hand-computed rankings, BM25 saved and loaded without pickle."""

import pytest

from dpr_service.core.bm25 import BM25
from dpr_service.core.formats import Passage
from dpr_service.core.fusion import convex, fuse, min_max, rrf, tune_alpha


def test_rrf_by_hand():
    dense = [("a", 0.9), ("b", 0.8), ("c", 0.1)]
    bm25 = [("c", 12.0), ("a", 3.0)]
    got = dict(rrf([dense, bm25], k=60))
    assert got == pytest.approx({"a": 1 / 61 + 1 / 62, "b": 1 / 62, "c": 1 / 63 + 1 / 61})
    assert [pid for pid, _ in rrf([dense, bm25])] == ["a", "c", "b"]
    # equal fused scores: passage id descending (trec_eval)
    assert [pid for pid, _ in rrf([[("x", 1.0)], [("y", 1.0)]])] == ["y", "x"]


def test_convex_by_hand():
    dense = [("a", 0.9), ("b", 0.7), ("c", 0.5)]  # normalised: a 1, b 0.5, c 0
    bm25 = [("c", 10.0), ("d", 6.0), ("a", 2.0)]  # normalised: c 1, d 0.5, a 0
    assert min_max(dense) == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.0})
    got = dict(convex(dense, bm25, alpha=0.3))
    assert got == pytest.approx({"a": 0.3, "b": 0.15, "c": 0.7, "d": 0.35})
    assert [pid for pid, _ in convex(dense, bm25, 0.3, top_k=2)] == ["c", "d"]
    assert [pid for pid, _ in convex(dense, bm25, 1.0)][:3] == ["a", "b", "d"]  # ties at 0 by id, descending
    with pytest.raises(ValueError):
        convex(dense, bm25, 1.5)
    with pytest.raises(ValueError):
        fuse(dense, bm25, "convex")


def test_tune_alpha_picks_the_best_on_dev():
    dense = {"q1": [("a", 0.9), ("b", 0.8)], "q2": [("c", 0.9), ("d", 0.1)]}
    bm25 = {"q1": [("b", 9.0), ("a", 1.0)], "q2": [("d", 5.0), ("c", 4.9), ("e", 0.0)]}
    qrels = {"q1": "b", "q2": "c"}

    def accuracy(run):
        return sum(max(run[q], key=lambda p: (run[q][p], p)) == qrels[q] for q in run) / len(run)

    alpha, table = tune_alpha(dense, bm25, accuracy, grid=(0.0, 0.5, 1.0))
    assert table == {0.0: 0.5, 0.5: 1.0, 1.0: 0.5} and alpha == 0.5


def test_bm25_saved_and_loaded_gives_the_same_hits(tmp_path):
    corpus = [Passage("the red lighthouse flashes", "Ember", "d1"), Passage("a green harbour light", "", "d2"),
              Passage("fishing boats in the harbour", "Port", "d3")]
    bm25 = BM25(corpus)
    files = bm25.save(tmp_path / "bm25")
    assert "ids.json" in files and not any(f.endswith((".pkl", ".pickle")) for f in files)
    loaded = BM25.load(tmp_path / "bm25")
    queries = ["harbour light", "red flash lighthouse"]
    assert loaded.search(queries, 3) == bm25.search(queries, 3)


def test_hybrid_evaluation_against_a_numpy_reference(tmp_path, tiny_model):
    """dpr eval's hybrid mode: the fused ranking equals one computed here from numpy dense scores and
    the BM25 of the same passages, and dense mode equals dpr eval's."""
    import numpy as np
    from conftest import write_beir

    from dpr_service.core.checkpoint import load_checkpoint
    from dpr_service.core.formats import read_beir_corpus, read_judged
    from dpr_service.core.inference import encode_texts
    from dpr_service.core.device import pick_runtime
    from dpr_service.core.metrics import retrieval_metrics, trec_order
    from index.build import build
    from index.evaluate import evaluate_index
    from index.hybrid import evaluate_modes

    root = write_beir(tmp_path / "beir", n=24, splits=("train", "dev"))
    corpus = read_beir_corpus(root / "corpus.jsonl")
    build(str(tiny_model), str(root), str(tmp_path / "index"), progress=False)
    got = evaluate_modes(str(tiny_model), str(tmp_path / "index"), str(root), split="dev", progress=False)
    plain = evaluate_index(str(tiny_model), str(tmp_path / "index"), str(root), split="dev", progress=False)
    assert got["dense"] == {k: v for k, v in plain.items() if k in got["dense"]}
    loaded = load_checkpoint(tiny_model)
    queries, _, qrels = read_judged(str(root), None, "dev")
    qids = list(queries)
    runtime = pick_runtime("cpu", "fp32")
    q = encode_texts(loaded.encoder, loaded.tokenizer, [queries[i] for i in qids], "query", runtime).numpy().astype(np.float64)
    p = encode_texts(loaded.encoder, loaded.tokenizer, corpus, "passage", runtime).numpy().astype(np.float64)
    dense_scores = q @ p.T
    bm25 = BM25(corpus).search([queries[i] for i in qids], 100)
    run = {}
    for i, qid in enumerate(qids):
        dense = trec_order([(p.id, float(dense_scores[i, j])) for j, p in enumerate(corpus)])[:100]
        run[qid] = dict(rrf([dense, trec_order(bm25[i])], top_k=100))
    expected = retrieval_metrics(run, qrels)
    assert {k: pytest.approx(v, abs=1e-9) for k, v in expected.items()} == {k: got["hybrid"][k] for k in expected}


def test_dpr_eval_hybrid_command(tmp_path, tiny_model, capsys):
    import json

    from conftest import write_beir

    from index.cli import eval_main, index_main

    root = write_beir(tmp_path / "beir", n=24, splits=("train", "dev"))
    assert index_main(["build", "--checkpoint", str(tiny_model), "--corpus", str(root), "--output", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    args = ["--checkpoint", str(tiny_model), "--index", str(tmp_path / "idx"), "--queries", str(root), "--split", "dev"]
    assert eval_main(args + ["--mode", "all", "--tune-split", "train", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"dense", "bm25", "hybrid", "tuned"} and result["fusion"]["fusion"] == "convex"
    assert 0 <= result["tuned"]["alpha"] <= 1 and len(result["tuned"]["ndcg@10_by_alpha"]) == 21
    assert eval_main(args + ["--mode", "hybrid", "--fusion", "convex"]) == 2  # no alpha: one-line error
    assert "needs --alpha" in capsys.readouterr().err


# ---- the artifact's BM25 index and its served fusion (dpr_service/core/hybrid.py, core/artifact.py)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model):
    """A BEIR set and two artifacts of it: with its BM25 index (the default) and built with --no-bm25."""
    from conftest import write_beir

    from index.build import build

    root = tmp_path_factory.mktemp("hybrid")
    beir = write_beir(root / "beir", n=24, splits=("train", "dev"))
    build(str(tiny_model), str(beir), str(root / "with"), factory="Flat", progress=False)
    build(str(tiny_model), str(beir), str(root / "without"), factory="Flat", progress=False, bm25=False)
    return root


def test_the_artifacts_bm25_or_one_over_the_store_rank_like_bm25_of_the_corpus(artifacts):
    from dpr_service.core.formats import read_corpus
    from dpr_service.core.hybrid import Retriever, artifact_bm25
    from dpr_service.core.metrics import trec_order
    from dpr_service.core.search import Searcher

    corpus = read_corpus(artifacts / "beir")
    queries = ["apple river", "comet walnut story", "zebra"]
    expected = [trec_order(hits) for hits in BM25(corpus).search(queries, 10)]
    with_bm25 = Searcher(artifacts / "with", bm25=True)
    assert with_bm25.bm25 is not None and artifact_bm25(with_bm25) is with_bm25.bm25
    without = Searcher(artifacts / "without", bm25=True)
    assert without.bm25 is None and not without.manifest.has_bm25
    for searcher in (with_bm25, without):
        assert Retriever(searcher, artifact_bm25(searcher)).rank("bm25", None, queries, 10) == expected
    with pytest.raises(ValueError, match="bm25=True"):  # an artifact's own BM25 is never rebuilt by mistake
        artifact_bm25(Searcher(artifacts / "with"))


def test_store_served_fusion_makes_a_new_verified_artifact(artifacts, tmp_path):
    import json
    import shutil

    from dpr_service.core.artifact import ArtifactError, read_manifest, served_fusion, store_served_fusion
    from dpr_service.core.search import Searcher

    index = tmp_path / "idx"
    shutil.copytree(artifacts / "with", index)
    assert served_fusion(read_manifest(index)) == ("rrf", None)  # nothing stored: RRF
    before = json.loads((index / "manifest.json").read_text())
    inode = (index.stat().st_ino, (index / "manifest.json").stat().st_ino)
    manifest = store_served_fusion(index, "convex", 0.3)
    assert served_fusion(manifest) == ("convex", 0.3) == served_fusion(Searcher(index, bm25=True).manifest)
    after = json.loads((index / "manifest.json").read_text())
    assert after == {**before, "hybrid": {"fusion": "convex", "alpha": 0.3}}  # the same files and checksums
    assert (index.stat().st_ino, (index / "manifest.json").stat().st_ino) != inode  # a new artifact, renamed into place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary or .old left
    store_served_fusion(index, "rrf")
    assert served_fusion(read_manifest(index)) == ("rrf", None)
    for fusion, alpha in (("convex", None), ("convex", 1.5), ("rrf", 0.5), ("max", None)):
        with pytest.raises(ValueError):
            store_served_fusion(index, fusion, alpha)
    assert served_fusion(read_manifest(index)) == ("rrf", None)
    with pytest.raises(ArtifactError, match="no such index directory"):
        store_served_fusion(tmp_path / "nowhere", "rrf")
    # a damaged artifact is refused, not copied into a new one
    (index / "bm25" / "ids.json").write_text("[]")
    with pytest.raises(ArtifactError, match="bm25/ids.json: checksum does not match"):
        store_served_fusion(index, "convex", 0.5)
    assert served_fusion(read_manifest(index)) == ("rrf", None)


@pytest.mark.parametrize("field, value, complaint", [
    ("hybrid", {"fusion": "convex"}, "bad hybrid"),
    ("hybrid", {"fusion": "convex", "alpha": 2}, "bad hybrid"),
    ("hybrid", {"fusion": "rrf", "alpha": 0.5}, "bad hybrid"),
    ("hybrid", "rrf", "bad hybrid"),
    ("files", {"../index.faiss": "0" * 64}, "bad file entry"),
    ("files", {"/etc/passwd": "0" * 64}, "bad file entry"),
    ("files", {"bm25/./x": "0" * 64}, "bad file entry"),
])
def test_a_manifest_with_a_bad_served_fusion_or_file_entry_is_refused(artifacts, tmp_path, field, value, complaint):
    import json
    import shutil

    from dpr_service.core.artifact import ArtifactError
    from dpr_service.core.search import Searcher

    index = tmp_path / "idx"
    shutil.copytree(artifacts / "with", index)
    manifest = json.loads((index / "manifest.json").read_text())
    manifest[field] = {**manifest["files"], **value} if field == "files" else value
    (index / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=complaint):
        Searcher(index)


def test_dpr_eval_stores_the_tuned_alpha_in_the_index(artifacts, tmp_path, tiny_model, capsys):
    import json
    import shutil

    from dpr_service.core.artifact import read_manifest, served_fusion
    from index.cli import eval_main

    index = tmp_path / "idx"
    shutil.copytree(artifacts / "with", index)
    args = ["--checkpoint", str(tiny_model), "--index", str(index), "--queries", str(artifacts / "beir"), "--split", "dev"]
    with pytest.raises(SystemExit) as exited:
        eval_main(args + ["--store-alpha"])
    assert exited.value.code == 2 and "--store-alpha stores the alpha --tune-split chooses" in capsys.readouterr().err
    assert eval_main(args + ["--mode", "hybrid", "--tune-split", "train", "--store-alpha", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert served_fusion(read_manifest(index)) == ("convex", result["tuned"]["alpha"])
    assert result["tuned"]["stored_in"] == str(index)
