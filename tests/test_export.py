"""``dpr export`` and ONNX Runtime encoding, against dpr-service's own encoder.

The oracle is :func:`dpr_service.core.inference.encode_texts` with the torch encoder (what ``POST
/encode`` returns); the exports are read back by the libraries users load them with:
sentence-transformers, transformers' DPR classes and ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpr_service.core import EncoderConfig, Passage, load_base_model, load_checkpoint, save_checkpoint
from dpr_service.core.device import Runtime
from dpr_service.core.export_cli import main as export_main
from dpr_service.core.inference import encode_texts

ROOT = Path(__file__).resolve().parents[1]
CPU = Runtime(torch.device("cpu"), "fp32")
QUERIES = ["what is the apple near the river", "comet", "which castle of the dragon is near the silver ocean in winter"]
TEXTS = ["the apple is near the river fact", "zebra", "the castle and the dragon story of the forest near the ocean " * 3]
TITLED = [Passage("the apple is near the river fact", "apple"), Passage("zebra"), Passage("the comet story", "comet and the planet")]

CONFIGS = {
    "shared-mean-cosine-prompts": EncoderConfig(pooling="mean", similarity="cosine", temperature=0.05, shared=True,
                                                query_max_length=8, passage_max_length=24,
                                                query_prompt="query: ", passage_prompt="passage: "),
    "two-cls-dot": EncoderConfig(pooling="cls", similarity="dot", shared=False, query_max_length=16, passage_max_length=32),
    "shared-cls-dot": EncoderConfig(pooling="cls", similarity="dot", shared=True, query_max_length=16, passage_max_length=32),
    "two-mean-cosine-prompts": EncoderConfig(pooling="mean", similarity="cosine", temperature=0.05, shared=False,
                                             query_max_length=8, passage_max_length=24,
                                             query_prompt="query: ", passage_prompt="passage: "),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """One checkpoint per CONFIGS entry; two-encoder ones get a passage encoder that differs from the
    query encoder (so a swapped route would show)."""
    root = tmp_path_factory.mktemp("export-ckpts")
    out = {}
    for name, cfg in CONFIGS.items():
        encoder, tokenizer = load_base_model(str(tiny_model), cfg)
        if not cfg.shared:
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in encoder.passage_model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        out[name] = root / name / "last"
        save_checkpoint(out[name], encoder, tokenizer)
    return out


def ours(path: Path, kind: str, items) -> torch.Tensor:
    loaded = load_checkpoint(path)
    return encode_texts(loaded.encoder, loaded.tokenizer, items, kind, CPU)


def export(args: list[str], capsys=None) -> tuple[int, str]:
    code = export_main(args)
    err = capsys.readouterr().err if capsys else ""
    return code, err


# ----------------------------------------------------------------------------- sentence-transformers


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sentence_transformers_export_gives_our_embeddings(name, checkpoints, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    ckpt, out = checkpoints[name], tmp_path / "st"
    assert export_main(["--checkpoint", str(ckpt), "--format", "sentence-transformers", "--output", str(out)]) == 0
    model = st.SentenceTransformer(str(out), device="cpu")
    q = torch.from_numpy(model.encode_query(QUERIES, convert_to_numpy=True))
    p = torch.from_numpy(model.encode_document(TEXTS, convert_to_numpy=True))
    torch.testing.assert_close(q, ours(ckpt, "query", QUERIES), atol=1e-5, rtol=0)
    torch.testing.assert_close(p, ours(ckpt, "passage", [Passage(t) for t in TEXTS]), atol=1e-5, rtol=0)
    cfg = CONFIGS[name]
    if not cfg.passage_prompt:  # a titled passage as the pair [title, text] (token type 0 on both, as ours)
        pairs = torch.from_numpy(model.encode_document([[p.title, p.text] for p in TITLED if p.title]))
        torch.testing.assert_close(pairs, ours(ckpt, "passage", [p for p in TITLED if p.title]), atol=1e-5, rtol=0)
    assert model.similarity_fn_name == ("cosine" if cfg.similarity == "cosine" else "dot")
    assert model.prompts.get("query", "") == cfg.query_prompt and model.prompts.get("document", "") == cfg.passage_prompt
    if cfg.similarity == "cosine":
        torch.testing.assert_close(q.norm(dim=1), torch.ones(len(QUERIES)), atol=1e-5, rtol=0)
    # the passage side truncates at the passage length, the query side at the query length
    long = "river " * 40
    torch.testing.assert_close(torch.from_numpy(model.encode_document([long])), ours(ckpt, "passage", [Passage(long)]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(model.encode_query([long])), ours(ckpt, "query", [long]), atol=1e-5, rtol=0)


# Every way a loader can call the export (issue 31.3), and the route it must give: LangChain, TEI and
# Infinity call plain encode() on passages; encode_query / encode_document pick their own prompts;
# an explicit prompt_name and task override them (docs/export.md has this table).
QUERY_PATHS = {
    "encode_query": lambda m, x: m.encode_query(x),
    "encode_query(prompt_name='query')": lambda m, x: m.encode_query(x, prompt_name="query"),
    "encode(prompt_name='query', task='query')": lambda m, x: m.encode(x, prompt_name="query", task="query"),
}
PASSAGE_PATHS = {
    "encode": lambda m, x: m.encode(x),
    "encode_document": lambda m, x: m.encode_document(x),
    "encode(prompt_name='document')": lambda m, x: m.encode(x, prompt_name="document"),
    "encode_document(prompt_name='document')": lambda m, x: m.encode_document(x, prompt_name="document"),
    "encode(task='document')": lambda m, x: m.encode(x, task="document"),
}


@pytest.mark.parametrize("name", list(CONFIGS) + ["shared-passage-prompt-only", "two-query-longer", "shared-query-longer"])
def test_sentence_transformers_every_call_path_gives_the_documented_route(name, checkpoints, tiny_model, tmp_path):
    """Issue 31.3: with a passage prompt, plain encode() dropped it (differing from /encode by up to
    9.3e-2): default_prompt_name was None. Each path is compared with /encode's vectors, on texts past
    both max lengths too, for checkpoints with both prompts, one prompt and a query length above the
    passage length."""
    st = pytest.importorskip("sentence_transformers")
    extra = {"shared-passage-prompt-only": EncoderConfig(pooling="mean", similarity="cosine", shared=True, query_max_length=8,
                                                         passage_max_length=24, passage_prompt="passage: "),
             "two-query-longer": EncoderConfig(pooling="mean", similarity="dot", shared=False, query_max_length=24,
                                               passage_max_length=8, query_prompt="query: ", passage_prompt="passage: "),
             "shared-query-longer": EncoderConfig(pooling="cls", similarity="dot", shared=True, query_max_length=24,
                                                  passage_max_length=8, passage_prompt="passage: ")}
    if name in extra:
        encoder, tokenizer = load_base_model(str(tiny_model), extra[name])
        if not extra[name].shared:
            with torch.no_grad():
                for p in encoder.passage_model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        ckpt = tmp_path / "ckpt"
        save_checkpoint(ckpt, encoder, tokenizer)
    else:
        ckpt = checkpoints[name]
    out = tmp_path / "st"
    assert export_main(["--checkpoint", str(ckpt), "--format", "sentence-transformers", "--output", str(out)]) == 0
    model = st.SentenceTransformer(str(out), device="cpu")
    texts = QUERIES + ["river " * 40]
    want_q, want_p = ours(ckpt, "query", texts), ours(ckpt, "passage", [Passage(t) for t in texts])
    for path, call in QUERY_PATHS.items():
        got = torch.as_tensor(call(model, texts))
        assert torch.allclose(got, want_q, atol=1e-5, rtol=0), f"{path}: max diff {(got - want_q).abs().max():.2e} from /encode (query)"
    for path, call in PASSAGE_PATHS.items():
        got = torch.as_tensor(call(model, texts))
        assert torch.allclose(got, want_p, atol=1e-5, rtol=0), f"{path}: max diff {(got - want_p).abs().max():.2e} from /encode (passage)"


# ----------------------------------------------------------------------------- transformers' DPR


@pytest.mark.parametrize("name", ["two-cls-dot", "shared-cls-dot"])
def test_hf_dpr_pooler_output_is_our_embedding(name, checkpoints, tmp_path):
    from transformers import AutoTokenizer, DPRContextEncoder, DPRQuestionEncoder

    ckpt, out = checkpoints[name], tmp_path / "dpr"
    assert export_main(["--checkpoint", str(ckpt), "--format", "hf-dpr", "--output", str(out)]) == 0
    q_tok = AutoTokenizer.from_pretrained(out / "question_encoder")
    c_tok = AutoTokenizer.from_pretrained(out / "context_encoder")
    q_enc = DPRQuestionEncoder.from_pretrained(out / "question_encoder").eval()
    c_enc = DPRContextEncoder.from_pretrained(out / "context_encoder").eval()
    with torch.no_grad():
        q = q_enc(**q_tok(QUERIES, truncation=True, padding=True, return_tensors="pt")).pooler_output
        titles, texts = [p.title for p in TITLED[:1]], [p.text for p in TITLED[:1]]
        titled = c_enc(**c_tok(titles, texts, truncation=True, padding=True, return_tensors="pt")).pooler_output
        p = c_enc(**c_tok(TEXTS, truncation=True, padding=True, return_tensors="pt")).pooler_output
    torch.testing.assert_close(q, ours(ckpt, "query", QUERIES), atol=1e-5, rtol=0)
    torch.testing.assert_close(p, ours(ckpt, "passage", [Passage(t) for t in TEXTS]), atol=1e-5, rtol=0)
    torch.testing.assert_close(titled, ours(ckpt, "passage", TITLED[:1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, reason", [
    ("shared-mean-cosine-prompts", "this checkpoint pools by mean"),
    ("two-mean-cosine-prompts", "this checkpoint pools by mean"),
])
def test_hf_dpr_refuses_what_dpr_cannot_represent(name, reason, checkpoints, tmp_path, capsys):
    code, err = export(["--checkpoint", str(checkpoints[name]), "--format", "hf-dpr", "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and reason in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_hf_dpr_refuses_cosine_and_prompts(tmp_path, tiny_model, capsys):
    for cfg, reason in ((EncoderConfig(pooling="cls", similarity="cosine", passage_max_length=32), "by cosine"),
                        (EncoderConfig(pooling="cls", query_prompt="q: ", passage_max_length=32), "has prompts")):
        encoder, tokenizer = load_base_model(str(tiny_model), cfg)
        save_checkpoint(tmp_path / "c", encoder, tokenizer)
        code, err = export(["--checkpoint", str(tmp_path / "c"), "--format", "hf-dpr", "--output", str(tmp_path / "o")], capsys)
        assert code == 2 and reason in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- ONNX


def onnx_embeddings(out: Path, ckpt: Path, kind: str, items) -> torch.Tensor:
    from dpr_service.core.onnx_export import OnnxEncoder, OnnxRuntime

    loaded = load_checkpoint(ckpt)
    runtime = OnnxRuntime(torch.device("cpu"), "fp32", onnx=OnnxEncoder(out, loaded.fingerprint))
    return encode_texts(loaded.encoder, loaded.tokenizer, items, kind, runtime, batch_size=2)


@pytest.mark.parametrize("name", ["shared-mean-cosine-prompts", "two-cls-dot"])
def test_onnx_runtime_gives_torch_embeddings_in_fp32(name, checkpoints, tmp_path):
    pytest.importorskip("onnxruntime")
    ckpt, out = checkpoints[name], tmp_path / "onnx"
    assert export_main(["--checkpoint", str(ckpt), "--format", "onnx", "--output", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.onnx")) == (["encoder.onnx"] if CONFIGS[name].shared else ["passage.onnx", "query.onnx"])
    # batches of 2 with different lengths (dynamic batch and sequence axes), titled and untitled passages
    passages = TITLED + [Passage(t) for t in TEXTS]
    torch.testing.assert_close(onnx_embeddings(out, ckpt, "query", QUERIES), ours(ckpt, "query", QUERIES), atol=1e-4, rtol=0)
    torch.testing.assert_close(onnx_embeddings(out, ckpt, "passage", passages), ours(ckpt, "passage", passages), atol=1e-4, rtol=0)
    import onnx

    graph = onnx.load(str(next(out.glob("*.onnx")))).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"] and graph.output[0].name == "embedding"
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]
    config = json.loads((out / "onnx_config.json").read_text())
    assert config["encoder"] == CONFIGS[name].to_dict() and config["quantize"] == "none"


INT8_MIN_COSINE = 0.999  # measured on tiny random BERTs: worst per-text cosine(int8, fp32) 0.99998; MiniLM: docs/export.md


@pytest.mark.parametrize("name", ["shared-mean-cosine-prompts", "two-cls-dot"])
def test_onnx_int8_stays_close_to_fp32(name, checkpoints, tmp_path):
    pytest.importorskip("onnxruntime")
    ckpt, out = checkpoints[name], tmp_path / "int8"
    assert export_main(["--checkpoint", str(ckpt), "--format", "onnx", "--quantize", "int8", "--output", str(out)]) == 0
    assert json.loads((out / "onnx_config.json").read_text())["quantize"] == "int8"
    passages = TITLED + [Passage(t) for t in TEXTS]
    for kind, items in (("query", QUERIES), ("passage", passages)):
        got, want = onnx_embeddings(out, ckpt, kind, items), ours(ckpt, kind, items)
        cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
        assert float(cos.min()) > INT8_MIN_COSINE, cos
        assert not torch.allclose(got, want, atol=1e-6), "int8 gave fp32's numbers: was anything quantised?"


def test_onnx_export_directory_is_checked(checkpoints, tmp_path):
    pytest.importorskip("onnxruntime")
    from dpr_service.core.onnx_export import OnnxEncoder, OnnxError, onnx_runtime

    ckpt = checkpoints["two-cls-dot"]
    loaded = load_checkpoint(ckpt)
    cache = tmp_path / "cache"
    first = onnx_runtime(loaded, "onnx", cache_dir=cache)
    assert first.onnx.directory == cache / f"{loaded.fingerprint}-fp32"
    stamp = (first.onnx.directory / "query.onnx").stat().st_mtime_ns
    assert onnx_runtime(loaded, "onnx", cache_dir=cache).onnx.directory == first.onnx.directory
    assert (first.onnx.directory / "query.onnx").stat().st_mtime_ns == stamp  # reused, not exported again
    with open(first.onnx.directory / "passage.onnx", "r+b") as fh:  # damaged: named, and the cache exports anew
        fh.seek(100)
        fh.write(b"\0\1\2\3")
    with pytest.raises(OnnxError, match="passage.onnx: checksum does not match"):
        OnnxEncoder(first.onnx.directory)
    again = onnx_runtime(loaded, "onnx", cache_dir=cache)
    torch.testing.assert_close(encode_texts(loaded.encoder, loaded.tokenizer, QUERIES, "query", again),
                               ours(ckpt, "query", QUERIES), atol=1e-4, rtol=0)
    # an int8 export made with other quantisation settings (an older release) is exported anew
    from dpr_service.core.checkpoint import write_checksums
    from dpr_service.core.onnx_export import QUANTIZATION

    int8 = onnx_runtime(loaded, "onnx-int8", cache_dir=cache).onnx.directory
    meta = json.loads((int8 / "onnx_config.json").read_text())
    assert meta["quantization"] == QUANTIZATION and QUANTIZATION["per_channel"] is True
    (int8 / "onnx_config.json").write_text(json.dumps({**meta, "quantization": {"per_channel": False}}))
    write_checksums(int8)
    assert onnx_runtime(loaded, "onnx-int8", cache_dir=cache).onnx.meta["quantization"] == QUANTIZATION
    other = load_checkpoint(checkpoints["shared-cls-dot"])
    with pytest.raises(OnnxError, match="not from the one in use"):
        onnx_runtime(other, "onnx", onnx_dir=first.onnx.directory)
    with pytest.raises(OnnxError, match="quantize none, but runtime onnx-int8"):
        onnx_runtime(loaded, "onnx-int8", onnx_dir=first.onnx.directory)


# ----------------------------------------------------------------------------- model card and errors


def test_model_card_has_training_config_data_and_dev_figures(checkpoints, tmp_path):
    run = tmp_path / "run"
    save = load_checkpoint(checkpoints["two-cls-dot"])
    save_checkpoint(run / "best", save.encoder, save.tokenizer)
    (run / "train_config.yaml").write_text("model: /models/tiny\ntrain: /data/train\ndev: /data/dev\nlr: 2.0e-05\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval": {"ndcg@10": 0.5}}) + "\n"
                                       + json.dumps({"step": 3, "loss": 0.2}) + "\n"
                                       + json.dumps({"step": 6, "eval": {"ndcg@10": 0.8125, "mrr@10": 0.75}}) + "\n")
    assert export_main(["--checkpoint", str(run / "best"), "--format", "sentence-transformers", "--output", str(tmp_path / "o")]) == 0
    card = (tmp_path / "o" / "README.md").read_text()
    for expected in ("- train: `data/train`", "- dev: `data/dev`", "| ndcg@10 | 0.8125 |", "| step | 6 |",
                     "lr: 2.0e-05", "| pooling | `'cls'` |", "sentence-transformers", "checkpoint `run/best`"):
        assert expected in card, expected
    assert "0.5000" not in card  # the last evaluation, not the first
    assert str(tmp_path) not in card and "/data/train" not in card  # a card travels: no absolute path of this machine


def test_model_card_of_a_run_killed_mid_write(checkpoints, tmp_path):
    """A damaged eval.json and a metrics.jsonl whose last line was cut by a crash: the export still
    succeeds, with the last complete evaluation (the files are read by the same readers as the jobs')."""
    run = tmp_path / "run"
    save = load_checkpoint(checkpoints["two-cls-dot"])
    save_checkpoint(run / "best", save.encoder, save.tokenizer)
    (run / "best" / "eval.json").write_text('{"ndcg@10": 0.9')
    (run / "metrics.jsonl").write_text(json.dumps({"step": 6, "eval": {"ndcg@10": 0.8125}}) + "\n" + '{"step": 9, "eval": {"ndcg')
    assert export_main(["--checkpoint", str(run / "best"), "--format", "sentence-transformers", "--output", str(tmp_path / "o")]) == 0
    card = (tmp_path / "o" / "README.md").read_text()
    assert "| ndcg@10 | 0.8125 |" in card and "| step | 6 |" in card


def test_model_card_without_a_run_says_so(checkpoints, tmp_path):
    assert export_main(["--checkpoint", str(checkpoints["shared-cls-dot"]), "--format", "hf-dpr", "--output", str(tmp_path / "o")]) == 0
    card = (tmp_path / "o" / "README.md").read_text()
    assert "None recorded (the run had no dev set)." in card and "Not recorded" in card


@pytest.mark.parametrize("args, complaint", [
    (["--format", "sentence-transformers", "--output", "{tmp}/o", "--checkpoint", "{tmp}/nowhere"], "no such checkpoint directory"),
    (["--format", "hf-dpr", "--output", "{tmp}/o", "--checkpoint", "{ckpt}", "--quantize", "int8"], "--quantize int8 is for --format onnx only"),
    (["--format", "tflite", "--output", "{tmp}/o", "--checkpoint", "{ckpt}"], "argument --format: invalid choice"),
    (["--format", "onnx", "--output", "{tmp}/o"], "the following arguments are required: --checkpoint"),
])
def test_cli_errors_are_one_line_and_exit_2(args, complaint, checkpoints, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, ckpt=checkpoints["two-cls-dot"]) for a in args]
    try:
        code = export_main(args)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and complaint in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_a_damaged_checkpoint_is_named(checkpoints, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "c"
    shutil.copytree(checkpoints["two-cls-dot"], ckpt)
    with open(ckpt / "query_encoder" / "model.safetensors", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\0\0\0\0")
    code, err = export(["--checkpoint", str(ckpt), "--format", "onnx", "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "model.safetensors: checksum does not match" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- docs/export.md


def doc_commands(text: str | None = None) -> list[str]:
    """The ``dpr ...`` lines of the sh blocks of ``text`` (default: docs/export.md)."""
    text = (ROOT / "docs" / "export.md").read_text() if text is None else text
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.startswith("dpr ")]


def test_docs_export_commands_run_as_written(checkpoints, tmp_path):
    """Every ``dpr`` command of docs/export.md, in order, from the repository root, with the doc's
    checkpoints (runs/demo/best, runs/dpr/best) replaced by a two-encoder CLS checkpoint and runs/ by
    a temporary directory; ``dpr serve`` is only parsed (--help): serving is tested above."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("sentence_transformers")
    commands = doc_commands()
    assert len(commands) == 7, commands
    ckpt = str(checkpoints["two-cls-dot"])
    for line in commands:
        line = line.replace("runs/demo/best", ckpt).replace("runs/dpr/best", ckpt).replace("runs/", f"{tmp_path}/")
        argv = shlex.split(line) + (["--help"] if line.startswith("dpr serve") else [])
        r = subprocess.run([sys.executable, "-m", "dpr_service.cli", *argv[1:]], capture_output=True, text=True, timeout=300,
                           cwd=ROOT, env={**os.environ, "DPR_ONNX_CACHE": str(tmp_path / "cache")})
        assert r.returncode == 0, f"{line}\n{r.stderr}"
    assert (tmp_path / "demo" / "export-st" / "modules.json").is_file()
    assert (tmp_path / "dpr" / "export-dpr" / "context_encoder" / "config.json").is_file()
    from dpr_service.core.artifact import read_manifest

    assert read_manifest(tmp_path / "demo" / "index-int8").extra["encoder_runtime"] == "onnx-int8"


def test_readme_export_commands_run_as_written(checkpoints, tmp_path):
    """The README's `dpr export` section, as written (its checkpoint replaced by a two-encoder one,
    runs/ by a temporary directory; ``dpr serve`` only parsed)."""
    pytest.importorskip("onnxruntime")
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Use the model elsewhere: `dpr export`"):]
    section = section[:section.index("\n## ", 1)]
    commands = doc_commands(section)
    assert [c.split()[:2] for c in commands] == [["dpr", "export"], ["dpr", "export"], ["dpr", "serve"]], commands
    ckpt = str(checkpoints["two-cls-dot"])
    for line in commands:
        line = line.replace("runs/tour/last", ckpt).replace("runs/", f"{tmp_path}/")
        argv = shlex.split(line) + (["--help"] if line.startswith("dpr serve") else [])
        r = subprocess.run([sys.executable, "-m", "dpr_service.cli", *argv[1:]], capture_output=True, text=True, timeout=300,
                           cwd=ROOT, env={**os.environ, "DPR_ONNX_CACHE": str(tmp_path / "cache")})
        assert r.returncode == 0, f"{line}\n{r.stderr}"
    assert (tmp_path / "tour" / "st" / "modules.json").is_file()
    int8 = tmp_path / "tour" / "onnx-int8"
    assert (int8 / "onnx_config.json").is_file() and (int8 / "query.onnx").is_file() and (int8 / "passage.onnx").is_file()


# ----------------------------------------------------------------------------- --runtime onnx: index build and serve


@pytest.fixture(scope="module")
def built(checkpoints, tmp_path_factory):
    """The same corpus indexed (Flat) by torch and by ONNX Runtime (fp32, exported on the fly into a cache)."""
    pytest.importorskip("onnxruntime")
    from conftest import write_beir
    from index.cli import index_main

    root = tmp_path_factory.mktemp("runtime")
    beir = write_beir(root / "beir", n=40, splits=("train", "test"))
    ckpt = checkpoints["two-cls-dot"]
    common = ["build", "--checkpoint", str(ckpt), "--corpus", str(beir), "--factory", "Flat", "--no-progress", "--device", "cpu"]
    assert index_main([*common, "--output", str(root / "torch")]) == 0
    os.environ["DPR_ONNX_CACHE"] = str(root / "cache")
    try:
        assert index_main([*common, "--output", str(root / "onnx"), "--runtime", "onnx"]) == 0
    finally:
        del os.environ["DPR_ONNX_CACHE"]
    return root, ckpt, beir


def assert_same_ranking(got: list[dict], want: list[dict], atol: float = 1e-4) -> None:
    """Equal ids rank by rank (a swap allowed only between two passages whose scores tie within
    ``atol``) and equal scores to ``atol``."""
    np = pytest.importorskip("numpy")
    np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want], atol=atol, rtol=0)
    for i, (g, w) in enumerate(zip(got, want)):
        if g["id"] != w["id"]:
            tied = [h["id"] for h in want if abs(h["score"] - w["score"]) <= atol]
            assert g["id"] in tied, (i, g, w)


def test_index_built_with_onnx_runtime_searches_like_torch(built):
    import numpy as np

    from dpr_service.core.artifact import read_manifest
    from dpr_service.core.search import Searcher

    root, ckpt, _ = built
    assert read_manifest(root / "onnx").extra["encoder_runtime"] == "onnx"
    assert read_manifest(root / "torch").extra["encoder_runtime"] == "torch"
    loaded = load_checkpoint(ckpt)
    q = ours(ckpt, "query", QUERIES).numpy()
    a, b = Searcher(root / "torch", loaded.fingerprint), Searcher(root / "onnx", loaded.fingerprint)
    np.testing.assert_allclose(b.index.reconstruct_n(0, b.count), a.index.reconstruct_n(0, a.count), atol=1e-4, rtol=0)
    for got, want in zip(b.search(q, 10), a.search(q, 10)):
        assert_same_ranking([{"id": h.id, "score": h.score} for h in got], [{"id": h.id, "score": h.score} for h in want])


def test_serve_with_onnx_runtime_answers_like_torch_and_scores_with_torch(built, tmp_path):
    from fastapi.testclient import TestClient

    from dpr_service.api.app import create_app
    from dpr_service.api.settings import Settings

    root, ckpt, _ = built
    body = {"queries": QUERIES, "top_k": 10}
    score = {"items": [{"question": QUERIES[0], "positive": {"title": "apple", "text": TEXTS[0]},
                        "negatives": [{"text": TEXTS[1]}, {"text": TEXTS[2]}]}], "in_batch": False}
    with TestClient(create_app(Settings(index=root / "torch", device="cpu", batch_max_wait_ms=1))) as torch_app, \
            TestClient(create_app(Settings(index=root / "torch", device="cpu", batch_max_wait_ms=1, runtime="onnx",
                                           onnx_cache=tmp_path / "cache"))) as onnx_app:
        assert onnx_app.get("/readyz").status_code == 200
        assert (tmp_path / "cache").is_dir()  # exported at start into DPR_ONNX_CACHE
        assert onnx_app.get("/info").json()["runtime"]["runtime"] == "onnx"  # /info says ONNX Runtime serves
        want, got = torch_app.post("/search", json=body).json(), onnx_app.post("/search", json=body).json()
        for g, w in zip(got["results"], want["results"]):
            assert_same_ranking(g, w)
        for kind, texts in (("query", QUERIES), ("passage", TEXTS)):
            enc = {"texts": texts, "kind": kind}
            torch.testing.assert_close(torch.tensor(onnx_app.post("/encode", json=enc).json()["embeddings"]),
                                       torch.tensor(torch_app.post("/encode", json=enc).json()["embeddings"]), atol=1e-4, rtol=0)
        got, want = onnx_app.post("/score", json=score).json(), torch_app.post("/score", json=score).json()
        assert got["results"] == want["results"] and "loss" in str(got)  # torch on both: bit-equal


def test_serve_with_an_export_of_another_checkpoint_is_not_ready(built, checkpoints, tmp_path):
    from fastapi.testclient import TestClient

    from dpr_service.api.app import create_app
    from dpr_service.api.settings import Settings

    root, _, _ = built
    assert export_main(["--checkpoint", str(checkpoints["shared-cls-dot"]), "--format", "onnx", "--output", str(tmp_path / "o")]) == 0
    with TestClient(create_app(Settings(index=root / "torch", device="cpu", runtime="onnx", onnx_dir=tmp_path / "o"))) as app:
        ready = app.get("/readyz")
        assert ready.status_code == 503 and "not from the one in use" in ready.json()["reason"]


def test_runtime_flags_are_checked(built, capsys):
    from dpr_service.api.serve import main as serve_main
    from index.cli import index_main

    root, ckpt, beir = built
    with pytest.raises(SystemExit) as stop:
        serve_main(["--index", str(root / "torch"), "--runtime", "tensorrt"])
    assert stop.value.code == 2 and "argument --runtime: invalid choice" in capsys.readouterr().err
    code = index_main(["build", "--checkpoint", str(ckpt), "--corpus", str(beir), "--output", str(root / "x"),
                       "--onnx-dir", str(root), "--no-progress"])
    assert code == 2 and "is for --runtime onnx or onnx-int8, not torch" in capsys.readouterr().err


def test_an_error_without_a_message_is_one_line_naming_its_type(monkeypatch, tmp_path, capsys):
    """An OSError() has an empty message: the CLI says its type (exit 2), it does not crash on it."""
    import dpr_service.core.export as export_module

    def fail(*args, **kwargs):
        raise PermissionError()

    monkeypatch.setattr(export_module, "export", fail)  # export_cli imports it when it runs (after its checks)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    code, err = export(["--checkpoint", str(tmp_path / "model"), "--format", "onnx", "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and err.strip() == "dpr export: error: PermissionError", err


def test_first_line_of_an_error():
    from dpr_service.core.errors import first_line

    assert first_line(ValueError("\n  bad value\n  more detail")) == "bad value"
    assert first_line(OSError()) == "OSError"
    assert first_line(ValueError("x" * 300), limit=200) == "x" * 200

    class WithMessage(Exception):  # pymilvus's errors carry their text in .message
        message = "collection not found"

    assert first_line(WithMessage("<MilvusException: (code=100, ...)>")) == "collection not found"
