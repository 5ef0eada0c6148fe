"""Fine-tuning defaults (issue 15) and the trainer's guards (issue 14): settings inferred from the
starting model, prompts, mined negatives and re-mining rounds, positive sampling, run length,
non-finite losses, and --resume conveniences. Tiny random models, built here."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, write_beir, write_plain

from dpr_service.core.checkpoint import CheckpointError, load_base_model, load_checkpoint, save_checkpoint
from dpr_service.core.config import EncoderConfig
from dpr_service.core.formats import Passage, read_train_data
from dpr_service.core.loss import in_batch_nll
from dpr_service.core.pretrained import infer_encoder_settings, resolve_encoder_config
from trainer.batches import EpochBatches, group_by_question
from trainer.config import ConfigError, TrainConfig
from trainer.train import NonFiniteLoss, default_epochs, lr_multiplier, train


def make_st_model(root: Path, tiny_model: Path, prompts=None, normalize=True, pooling="mean", max_len=48,
                  similarity_fn_name=None, new_format=False, extra_modules=()) -> Path:
    """The tiny BERT dressed as a sentence-transformers directory (``new_format``: as
    sentence-transformers >= 5 writes the Pooling config)."""
    shutil.copytree(tiny_model, root)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    modules += [{"idx": len(modules) + i, "name": str(len(modules) + i), "path": path, "type": kind}
                for i, (path, kind) in enumerate(extra_modules)]
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir()
    pool = ({"embedding_dimension": 32, "pooling_mode": pooling, "include_prompt": True} if new_format else
            {"word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean",
             "pooling_mode_max_tokens": pooling == "max"})
    (root / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_len, "do_lower_case": False}))
    (root / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts or {}, "similarity_fn_name": similarity_fn_name}))
    return root


def base_cfg(tmp_path, model, data, **kw) -> TrainConfig:
    args = dict(model=str(model), train=str(data), output=str(tmp_path / "out"), batch_size=4, lr=1e-3,
                log_every=1, progress=False, seed=3, max_steps=4)
    args.update(kw)
    return TrainConfig.from_settings(**args)


# ----------------------------------------------------------------------------- settings from the model


def test_sentence_transformers_directory_gives_its_own_settings(tmp_path, tiny_model):
    st = make_st_model(tmp_path / "st", tiny_model, prompts={"query": "query: ", "document": "passage: "})
    inferred = infer_encoder_settings(st)
    assert inferred.kind == "sentence-transformers"
    assert {k: inferred.values[k] for k in ("pooling", "similarity", "temperature", "query_max_length",
                                            "passage_max_length", "shared", "query_prompt", "passage_prompt")} == {
        "pooling": "mean", "similarity": "cosine", "temperature": 0.05, "query_max_length": 48,
        "passage_max_length": 48, "shared": True, "query_prompt": "query: ", "passage_prompt": "passage: "}
    assert inferred.sources["pooling"] == "1_Pooling/config.json"
    assert "Normalize" in inferred.sources["similarity"]
    # a value given by the user always wins; a similarity given by hand brings its own temperature
    config, sources = resolve_encoder_config(st, {"pooling": "cls", "similarity": "dot"})
    assert (config.pooling, config.similarity, config.temperature) == ("cls", "dot", 1.0)
    assert sources["pooling"] == "given"


@pytest.mark.parametrize("lengths", [dict(query_length=12, document_length=20, max_seq_length=100),
                                     dict(max_seq_length=16), dict(document_length=20)])
def test_the_lengths_sentence_transformers_6_writes_are_read(tmp_path, tiny_model, lengths):
    """sentence-transformers >= 6 writes no ``max_seq_length`` in sentence_bert_config.json (it is the
    tokenizer's ``model_max_length``) and may write per-task ``query_length`` / ``document_length``
    there: both were ignored (DPR's 64 / 256 instead). The oracle: the model saved by
    sentence-transformers itself, and its encode_query / encode_document of texts past every limit."""
    st = pytest.importorskip("sentence_transformers")
    import inspect

    from sentence_transformers.models import Normalize, Pooling, Transformer

    from dpr_service.core.device import pick_runtime
    from dpr_service.core.inference import encode_texts

    if "query_length" not in inspect.signature(Transformer.__init__).parameters:
        pytest.skip("sentence-transformers < 6 has no per-task lengths")
    transformer = Transformer(str(tiny_model), **lengths)
    model = st.SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean"), Normalize()],
                                   device="cpu")
    model.save(str(tmp_path / "st6"))
    seq = lengths.get("max_seq_length", 128)  # else the tiny model's positions
    want = {"query_max_length": lengths.get("query_length", seq), "passage_max_length": lengths.get("document_length", seq)}
    config = resolve_encoder_config(tmp_path / "st6", {})[0]
    assert {k: getattr(config, k) for k in want} == want
    encoder, tokenizer = load_base_model(str(tmp_path / "st6"), config)
    encoder.eval()
    long = [" ".join(["word"] * 150), " ".join(["river", "stone"] * 40)]
    runtime = pick_runtime("cpu", "fp32")
    ours_q = encode_texts(encoder, tokenizer, long, "query", runtime)
    ours_p = encode_texts(encoder, tokenizer, [Passage(t) for t in long], "passage", runtime)
    torch.testing.assert_close(torch.from_numpy(model.encode_query(long)), ours_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(model.encode_document(long)), ours_p, atol=1e-5, rtol=0)


def test_plain_transformers_model_keeps_dpr_defaults_and_a_checkpoint_its_own(tmp_path, tiny_model):
    # DPR's defaults, the 256-token passages capped at the tiny model's 128 positions
    assert resolve_encoder_config(tiny_model, {})[0] == EncoderConfig(passage_max_length=128)
    st = make_st_model(tmp_path / "st", tiny_model, normalize=False, pooling="cls", similarity_fn_name="dot")
    config = resolve_encoder_config(st, {})[0]
    assert (config.pooling, config.similarity, config.temperature) == ("cls", "dot", 1.0)
    custom = EncoderConfig(pooling="mean", similarity="cosine", temperature=0.07, query_max_length=20,
                           passage_max_length=40, shared=True, query_prompt="q: ")
    encoder, tokenizer = load_base_model(str(tiny_model), custom)
    save_checkpoint(tmp_path / "ckpt", encoder, tokenizer)
    assert resolve_encoder_config(tmp_path / "ckpt", {})[0] == custom
    # and training starts from that checkpoint's weights
    again, _ = load_base_model(str(tmp_path / "ckpt"), custom)
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), again.state_dict().values()))


def test_prompts_are_tokenised_everywhere_and_kept_in_the_checkpoint(tmp_path, tiny_model):
    config = EncoderConfig(query_prompt="apple ", passage_prompt="river ", query_max_length=16, passage_max_length=16)
    encoder, tokenizer = load_base_model(str(tiny_model), config)
    hf = tokenizer.hf
    q = tokenizer.queries(["what is the comet"])["input_ids"][0].tolist()
    assert q == hf("apple what is the comet")["input_ids"]
    titled = tokenizer.passages([Passage("the comet story", "comet")])["input_ids"][0].tolist()
    assert titled == hf("river comet", "the comet story")["input_ids"]
    untitled = tokenizer.passages([Passage("the comet story")])["input_ids"][0].tolist()
    assert untitled == hf("river the comet story")["input_ids"]
    save_checkpoint(tmp_path / "ckpt", encoder, tokenizer)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.tokenizer.queries(["what is the comet"])["input_ids"][0].tolist() == q


def test_training_from_a_sentence_transformers_model_uses_its_settings(tmp_path, tiny_model, caplog):
    st = make_st_model(tmp_path / "st", tiny_model, prompts={"query": "query: "})
    data = write_plain(tmp_path / "train.jsonl", n=16)
    caplog.set_level("INFO", logger="trainer")
    out = train(base_cfg(tmp_path, st, data))
    loaded = load_checkpoint(out)
    assert (loaded.config.pooling, loaded.config.similarity, loaded.config.temperature, loaded.config.shared,
            loaded.config.query_prompt) == ("mean", "cosine", 0.05, True, "query: ")
    assert "pooling 'mean' (1_Pooling/config.json)" in caplog.text
    saved = (tmp_path / "out" / "train_config.yaml").read_text()
    assert "pooling: mean" in saved and "temperature: 0.05" in saved


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "no such directory"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "not a transformers model directory (no config.json)"),
])
def test_a_bad_model_directory_is_refused_before_the_data_and_leaves_nothing(tmp_path, make, message):
    model = make(tmp_path)
    with pytest.raises(ConfigError, match=r"--model .*" + message.replace("(", r"\(").replace(")", r"\)")):
        train(TrainConfig.from_settings(model=str(model), train=str(tmp_path / "no-data.jsonl"), output=str(tmp_path / "out")))
    assert not (tmp_path / "out" / "train_config.yaml").exists()


# ----------------------------------------------------------------------------- data, length, negatives


def test_one_positive_per_question_per_epoch(tmp_path, tiny_model):
    root = write_beir(tmp_path / "beir", n=12, splits=("train",))
    qrels = tmp_path / "beir" / "qrels" / "train.tsv"  # give every question a second positive
    rows = qrels.read_text().splitlines()
    extra = [f"{r.split(chr(9))[0]}\t{rows[1 + (i + 1) % (len(rows) - 1)].split(chr(9))[1]}\t1" for i, r in enumerate(rows[1:])]
    qrels.write_text("\n".join(rows + extra) + "\n")
    data = read_train_data(root, "train")
    groups = group_by_question(data.examples)
    assert len(data.examples) == 24 and len(groups) == 12
    encoder, tokenizer = load_base_model(str(tiny_model), EncoderConfig(passage_max_length=64))
    picks = []
    for epoch in range(4):
        batches = EpochBatches(data.examples, data.corpus, tokenizer, 4, 0, seed=1, epoch=epoch, groups=groups)
        assert len(batches) == 3
        chosen = [data.examples[i] for i in batches.order]
        assert sorted(ex.query for ex in chosen) == sorted(data.examples[g[0]].query for g in groups)
        picks.append(tuple(ex.positive.id for ex in chosen))
    assert len(set(picks)) > 1  # the positive drawn changes between epochs
    again = EpochBatches(data.examples, data.corpus, tokenizer, 4, 0, seed=1, epoch=2, groups=groups)
    assert tuple(data.examples[i].positive.id for i in again.order) == picks[2]  # seeded


def test_run_length_rule_and_schedule():
    assert [default_epochs(n) for n in (50, 300, 807, 2590, 9_000, 110_000)] == [10, 10, 10, 3, 1, 1]
    assert [round(lr_multiplier(s, 2, 10), 3) for s in (0, 1, 2, 6, 10, 11)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]


@pytest.mark.parametrize("method", ["model", "bm25"])
def test_mined_negatives_skip_copies_of_positives_and_resume_reads_them(tmp_path, tiny_model, method):
    root = write_beir(tmp_path / "beir", n=16, splits=("train",))
    corpus = [json.loads(line) for line in (root / "corpus.jsonl").read_text().splitlines()]
    copy = dict(corpus[0], _id="copy-of-" + corpus[0]["_id"])  # the same text under another id
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(c) for c in corpus + [copy]) + "\n")
    cfg = base_cfg(tmp_path, tiny_model, root, negatives=method, pooling="mean", similarity="cosine", mine_ratio=1.0,
                   stop_after=2)
    train(cfg)
    mined = tmp_path / "out" / "negatives" / "round-0.jsonl"
    lines = [json.loads(line) for line in mined.read_text().splitlines()]
    assert lines[0]["stats"]["questions"] == 16 and lines[0]["stats"]["examples"] == 16
    # the question whose positive is corpus[0] never gets its copy
    qrels = dict(r.split("\t")[:2][::-1] for r in (root / "qrels" / "train.tsv").read_text().splitlines()[1:])
    queries = {json.loads(q)["_id"]: json.loads(q)["text"] for q in (root / "queries.jsonl").read_text().splitlines()}
    owner = queries[qrels[corpus[0]["_id"]]]
    assert copy["_id"] not in next(line["negatives"] for line in lines[1:] if line["query"] == owner)
    assert lines[0]["stats"].get("skipped_copy_of_positive", 0) >= (1 if method == "model" else 0)
    before = mined.stat().st_mtime_ns
    train(base_cfg(tmp_path, tiny_model, root, negatives=method, pooling="mean", similarity="cosine", mine_ratio=1.0,
                   resume=True))
    assert mined.stat().st_mtime_ns == before  # read back, not mined again


def test_remining_rounds_resume_exactly(tmp_path, tiny_model):
    root = write_beir(tmp_path / "beir", n=16, splits=("train", "dev"))
    kw = dict(negatives="model", remine_every=1, epochs=3, max_steps=None, pooling="mean", similarity="cosine")
    straight = train(base_cfg(tmp_path / "a", tiny_model, root, output=str(tmp_path / "a"), **kw))
    assert sorted(p.name for p in (tmp_path / "a" / "negatives").iterdir()) == ["round-0.jsonl", "round-1.jsonl", "round-2.jsonl"]
    train(base_cfg(tmp_path / "b", tiny_model, root, output=str(tmp_path / "b"), stop_after=5, **kw))  # into round 1
    resumed = train(base_cfg(tmp_path / "b", tiny_model, root, output=str(tmp_path / "b"), resume=True, **kw))
    a, b = load_checkpoint(straight).encoder.state_dict(), load_checkpoint(resumed).encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("round-1.jsonl", "round-2.jsonl"):
        assert (tmp_path / "a" / "negatives" / name).read_text() == (tmp_path / "b" / "negatives" / name).read_text()


# ----------------------------------------------------------------------------- guards


def test_a_nan_loss_stops_the_run_naming_the_step_and_writes_no_checkpoint(tmp_path, tiny_model):
    data = write_plain(tmp_path / "train.jsonl", n=16)
    with pytest.raises(NonFiniteLoss, match=r"step \d+: the loss is nan"):
        train(base_cfg(tmp_path, tiny_model, data, lr=1e20, max_steps=8, save_every=1))
    last = tmp_path / "out" / "last"
    if last.exists():  # only checkpoints from before the divergence, and they load
        load_checkpoint(last)
    for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))


def test_skipping_non_finite_steps_counts_them(tmp_path, tiny_model):
    data = write_plain(tmp_path / "train.jsonl", n=16)
    out = train(base_cfg(tmp_path, tiny_model, data, lr=1e20, max_steps=6, on_nonfinite="skip"))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_nonfinite"] >= 1
    load_checkpoint(out)  # the weights it kept are finite


def test_non_finite_weights_are_never_written_nor_loaded(tmp_path, tiny_model, monkeypatch):
    encoder, tokenizer = load_base_model(str(tiny_model), EncoderConfig(passage_max_length=64))
    with torch.no_grad():
        next(encoder.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match="not finite"):
        save_checkpoint(tmp_path / "nan", encoder, tokenizer)
    assert not (tmp_path / "nan").exists()
    import dpr_service.core.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "is_finite", lambda _: True)  # a checkpoint written by something else
    save_checkpoint(tmp_path / "nan", encoder, tokenizer)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="not finite"):
        load_checkpoint(tmp_path / "nan")


def test_resume_accepts_the_same_paths_written_differently_and_output_alone(tmp_path, tiny_model, monkeypatch):
    from trainer.cli import main

    monkeypatch.chdir(tmp_path)
    data = write_plain(tmp_path / "train.jsonl", n=16)
    shutil.copytree(tiny_model, tmp_path / "m")
    assert main(["--model", "m", "--train", "./train.jsonl", "--output", "run", "--max-steps", "4", "--stop-after", "2",
                 "--batch-size", "4", "--no-progress"]) == 0
    assert main(["--model", str(tmp_path / "m"), "--train", "train.jsonl", "--output", "./run", "--max-steps", "4",
                 "--batch-size", "4", "--resume", "--stop-after", "1", "--no-progress"]) == 0
    assert main(["--output", "run", "--resume", "--no-progress"]) == 0  # from the run's saved config
    state = json.loads((tmp_path / "run" / "last" / "training_state" / "state.json").read_text())
    assert state["progress"]["step"] == 4


def test_the_step_uses_the_checkpoint_temperature(tiny_model):
    from dpr_service.core.device import pick_runtime
    from trainer.distributed import Dist
    from trainer.evaluate import batch_losses
    from dpr_service.core.batches import collate
    from dpr_service.core.formats import TrainExample

    config = EncoderConfig(pooling="mean", similarity="cosine", temperature=0.05, query_max_length=16, passage_max_length=16)
    encoder, tokenizer = load_base_model(str(tiny_model), config)
    encoder.eval()
    examples = [TrainExample(f"what is the {w}", Passage(f"the {w} story", id=w)) for w in ("comet", "river", "apple")]
    batch = collate(examples, [[], [], []], tokenizer)
    runtime = pick_runtime("cpu", "fp32")
    with torch.no_grad():
        q = encoder.encode_queries(**batch.queries)
        p = encoder.encode_passages(**batch.passages)
    by_hand = torch.nn.functional.cross_entropy(
        torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(p, dim=-1).T / 0.05,
        batch.positive_idx, reduction="none")
    assert torch.allclose(batch_losses(encoder, batch, runtime), by_hand, atol=1e-5)  # dev loss and /score's
    from trainer.step import forward_backward, prepare_models

    scaler = runtime.grad_scaler()
    step_loss = forward_backward(encoder, prepare_models(encoder, Dist(), runtime.device), batch, runtime, Dist(), scaler)
    assert torch.allclose(step_loss, by_hand.mean(), atol=1e-5)  # the training step's
    assert not torch.allclose(in_batch_nll(q, p, batch.positive_idx, similarity="cosine", temperature=1.0, reduction="none"), by_hand, atol=1e-3)
    assert Dist().world_size == 1 and Dist().is_main


def test_a_plain_model_directory_loads_as_an_untrained_checkpoint(tmp_path, tiny_model):
    """The zero-shot baseline is one command: `dpr index build --checkpoint MODEL_DIR` (issue 14.8)."""
    st = make_st_model(tmp_path / "st", tiny_model)
    loaded = load_checkpoint(st)
    assert (loaded.config.pooling, loaded.config.similarity, loaded.config.shared) == ("mean", "cosine", True)
    assert loaded.fingerprint == load_checkpoint(st).fingerprint  # stable
    expected, _ = load_base_model(str(st), loaded.config)
    assert all(torch.equal(a, b) for a, b in zip(expected.state_dict().values(), loaded.encoder.state_dict().values()))
    plain = load_checkpoint(tiny_model)
    assert (plain.config.pooling, plain.config.shared) == ("cls", False)
    assert plain.fingerprint != loaded.fingerprint


def test_missing_hard_negatives_warning_says_what_happens(tmp_path, tiny_model, caplog):
    data = write_plain(tmp_path / "train.jsonl", n=16, hard_negatives=1)
    caplog.set_level("INFO", logger="trainer")
    train(base_cfg(tmp_path, tiny_model, data, hard_negatives=2, max_steps=1))
    assert "16 of 16 examples have fewer than 2 hard negatives of their own: each is topped up with its DPR " \
           "negative_ctxs, then random passages of the pool" in caplog.text


def test_non_finite_embeddings_are_refused(tiny_model, monkeypatch):
    from dpr_service.core.device import pick_runtime
    from dpr_service.core.inference import NonFiniteEmbeddings, encode_texts

    encoder, tokenizer = load_base_model(str(tiny_model), EncoderConfig(passage_max_length=64))
    real = encoder.encode_passages

    def overflowing(**inputs):
        emb = real(**inputs)
        return torch.where(torch.arange(emb.shape[0])[:, None] == 1, torch.tensor(float("inf")), emb)

    monkeypatch.setattr(encoder, "encode_passages", overflowing)
    with pytest.raises(NonFiniteEmbeddings, match="1 passage"):
        encode_texts(encoder, tokenizer, [Passage("the comet story"), Passage("the river")], "passage", pick_runtime("cpu", "fp32"))


def test_every_flag_shows_one_default_in_help():
    import re

    from trainer.cli import build_parser

    text = re.sub(r"\s+", " ", build_parser().format_help())
    for option in re.split(r" (?=--[a-z])", text.split("options:")[1]):
        assert option.count("(default:") <= 1, option
    assert "--shared-encoder, --no-shared-encoder one encoder for questions and passages, or two (--no- shared-encoder, as DPR) (default: from the starting model)" in text


def test_sentence_transformers_variants(tmp_path, tiny_model, monkeypatch):
    """The Pooling config as sentence-transformers >= 5 writes it; its default similarity (cosine)
    when nothing says otherwise; max pooling refused unless --pooling is given; modules this encoder
    cannot run refused by name; a Hub id that cannot be reached named as such."""
    from dpr_service.core.pretrained import ModelDirError

    new = make_st_model(tmp_path / "new", tiny_model, new_format=True, normalize=False)
    config = resolve_encoder_config(new, {})[0]
    assert (config.pooling, config.similarity, config.temperature) == ("mean", "cosine", 0.05)
    maxed = make_st_model(tmp_path / "max", tiny_model, pooling="max")
    with pytest.raises(ModelDirError, match="pooling .* is not supported .*pass --pooling"):
        resolve_encoder_config(maxed, {})
    assert resolve_encoder_config(maxed, {"pooling": "mean"})[0].pooling == "mean"
    dense = make_st_model(tmp_path / "dense", tiny_model, extra_modules=[("2_Dense", "sentence_transformers.models.Dense")])
    with pytest.raises(ModelDirError, match=r"2_Dense \(sentence_transformers.models.Dense\)"):
        resolve_encoder_config(dense, {"pooling": "mean"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelDirError, match="no such directory, and not a Hugging Face Hub model that could be reached"):
        resolve_encoder_config("some-org/no-such-model", {})
    with pytest.raises(ModelDirError, match="no such directory$"):
        resolve_encoder_config(str(tmp_path / "a" / "b"), {})


def test_auto_negatives_follow_the_data_and_the_starting_model(tmp_path, tiny_model):
    from trainer.negatives import choose_method

    with_negatives = read_train_data(write_plain(tmp_path / "a.jsonl", n=8, hard_negatives=1))
    pairs_only = read_train_data(write_beir(tmp_path / "beir", n=8, splits=("train",)), "train")
    assert choose_method("auto", with_negatives, "transformers") == "given"
    assert choose_method("auto", pairs_only, "sentence-transformers") == "model"
    assert choose_method("auto", pairs_only, "dpr-service checkpoint") == "model"
    assert choose_method("auto", pairs_only, "transformers") == "bm25"  # an untrained encoder ranks at random
    assert choose_method("random", with_negatives, "transformers") == "random"


def _unindexable_beir(root: Path) -> Path:
    """A BEIR directory whose passages are all stop words or punctuation: nothing BM25 can index."""
    texts = ["the of and", "!!! ... ???", "a", "is it, or was it?", "and or the", "to be or not to be"]
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                               for i, t in enumerate(texts)))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"question {i}"}) + "\n"
                                                for i in range(len(texts))))
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                              "".join(f"q{i}\td{i}\t1\n" for i in range(len(texts))))
    return root


def test_auto_negatives_on_a_corpus_bm25_cannot_index_fall_back_to_random(tmp_path, tiny_model, caplog, capsys):
    """Issue 31.5: `dpr train --negatives auto` from an untrained encoder chose BM25 and stopped with
    BM25Error; now it trains on random negatives with a warning naming the corpus file (as `dpr index
    build` builds its dense index without BM25), and `--negatives bm25`, asked for, is exit 2 naming it."""
    from trainer.cli import main
    from trainer.negatives import choose_method

    beir = _unindexable_beir(tmp_path / "beir")
    corpus = str(beir / "corpus.jsonl")
    with caplog.at_level("WARNING", logger="trainer"):
        assert choose_method("auto", read_train_data(beir, "train"), "transformers") == "random"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(corpus in m and "random" in m for m in warned), warned
    common = ["--model", str(tiny_model), "--train", str(beir), "--max-steps", "2", "--batch-size", "2", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "auto"), "--negatives", "auto"]) == 0
    assert (tmp_path / "auto" / "last").is_dir() and not (tmp_path / "auto" / "negatives").exists()
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "bm25"), "--negatives", "bm25"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dpr train: error: {corpus}: ") and "--negatives" in err[0], err


def test_a_fresh_run_never_reuses_negatives_mined_by_another(tmp_path, tiny_model):
    root = write_beir(tmp_path / "beir", n=16, splits=("train",))
    stale = tmp_path / "out" / "negatives" / "round-0.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"stats": {"questions": 1}}\n{"query": "x", "negatives": ["nope"]}\n')
    train(base_cfg(tmp_path, tiny_model, root, negatives="bm25", max_steps=2, stop_after=1))
    assert '"nope"' not in stale.read_text()
    stale.write_text("{not json\n")
    with pytest.raises(CheckpointError, match=r"round-0.jsonl:1: damaged mined-negatives file"):
        train(base_cfg(tmp_path, tiny_model, root, negatives="bm25", max_steps=2, resume=True))


def test_remining_needs_model_negatives(tmp_path, tiny_model):
    root = write_beir(tmp_path / "beir", n=16, splits=("train",))
    with pytest.raises(ConfigError, match="--remine-every mines with the model being trained, but the negatives are 'bm25'"):
        train(base_cfg(tmp_path, tiny_model, root, negatives="bm25", remine_every=1))


def test_model_mining_applies_the_ratio_to_each_examples_own_positive(tmp_path, tiny_model):
    """NV-Retriever's ceiling is per (question, positive): a question with a weak and a strong
    positive keeps, for the strong one, the negatives the weak one's ceiling would exclude."""
    from dpr_service.core.device import pick_runtime
    from dpr_service.core.inference import encode_texts
    from trainer.negatives import mine

    root = write_beir(tmp_path / "beir", n=24, splits=("train",))
    data = read_train_data(root, "train")
    q0 = data.examples[0].query  # give question 0 every passage of questions 1-3 as extra positives
    extra = [ex.positive for ex in data.examples[1:4]]
    data.examples += [type(data.examples[0])(q0, p) for p in extra]
    from dpr_service.core.formats import share_known_positives

    for ex in data.examples:
        if ex.query == q0:
            ex.known_positive_ids = frozenset({data.examples[0].positive.id, *(p.id for p in extra)})
    share_known_positives(data.examples)
    config = EncoderConfig(pooling="mean", similarity="cosine", temperature=0.05, passage_max_length=64, shared=True)
    encoder, tokenizer = load_base_model(str(tiny_model), config)
    runtime = pick_runtime("cpu", "fp32")
    ratio = 1.0  # (a random tiny model's cosines are all close: at 0.95 nothing would pass)
    mined, stats = mine("model", data, encoder, tokenizer, runtime, depth=50, ratio=ratio, progress=False)
    q = encode_texts(encoder, tokenizer, [q0], "query", runtime)[0]
    by_id = {p.id: p for p in data.corpus}
    own = [ex for ex in data.examples if ex.query == q0]
    for ex in own:
        ceiling = ratio * float(q @ encode_texts(encoder, tokenizer, [ex.positive], "passage", runtime)[0])
        negs = mined[(q0, ex.positive.id)]
        assert all(pid not in ex.known_positive_ids for pid in negs)
        scores = encode_texts(encoder, tokenizer, [by_id[i] for i in negs], "passage", runtime) @ q if negs else torch.empty(0)
        assert bool((scores <= ceiling + 1e-5).all())
    strength = {ex.positive.id: float(q @ encode_texts(encoder, tokenizer, [ex.positive], "passage", runtime)[0]) for ex in own}
    counts = [len(mined[(q0, pid)]) for pid in sorted(strength, key=strength.get)]
    assert counts == sorted(counts) and counts[0] < counts[-1]  # a stronger positive keeps more negatives
