"""``dpr export``: a checkpoint in the formats other tools load, each with a model card.

* ``sentence-transformers``: a directory ``SentenceTransformer(OUT)`` loads as it is, with the
  checkpoint's pooling, normalisation (cosine), max lengths and prompts. A checkpoint with two
  encoders becomes sentence-transformers' ``Router`` with a ``query`` and a ``document`` route, so
  ``encode_query`` / ``encode_document`` give dpr-service's query / passage embeddings; a shared
  encoder is one ``Transformer`` with ``query_length`` / ``document_length``. Plain ``encode()``
  gives the passage embedding (the document route, its length and, as ``default_prompt_name``, the
  passage prompt), as tools that call ``encode()`` on passages expect.
* ``hf-dpr``: ``question_encoder/`` and ``context_encoder/`` for transformers'
  ``DPRQuestionEncoder`` / ``DPRContextEncoder``, whose ``pooler_output`` is the CLS vector (DPR's
  convention, Karpukhin et al. 2020). Only a checkpoint whose embeddings *are* that vector (BERT
  encoders, CLS pooling, dot product, no prompts) is exported; any other is refused
  (:class:`ExportError`) with the reason.
* ``onnx``: :mod:`dpr_service.core.onnx_export`.

Every export writes ``README.md`` (:func:`model_card`): the encoder settings, the training
configuration (``train_config.yaml`` of the checkpoint or its run) and the dev evaluation figures
(``eval.json`` of the checkpoint, or the run's ``metrics.jsonl``) when there are any.

Token types: dpr-service feeds the encoders ``input_ids`` and ``attention_mask`` only (token type 0
everywhere, also for a titled passage's text segment), so every exported tokenizer is saved with
``model_input_names = ["input_ids", "attention_mask"]``: tools that load it then tokenise the same way.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoint import Loaded, atomic_directory, load_checkpoint
from .fsio import without_dirs
from .config import EncoderConfig
from .formats import metrics_lines, read_eval

FORMATS = ("sentence-transformers", "hf-dpr", "onnx")
MODEL_INPUTS = ["input_ids", "attention_mask"]  # what BiEncoder.encode_* feeds the model


class ExportError(ValueError):
    """A checkpoint that cannot be exported in the asked format; the message says why (one line)."""


def export(checkpoint: Path | str, fmt: str, output: Path | str, quantize: str | None = None) -> Path:
    """Export ``checkpoint`` (loaded by :func:`~dpr_service.core.checkpoint.load_checkpoint`) as
    ``fmt`` (one of :data:`FORMATS`) into the directory ``output``, written atomically (a directory
    already there is replaced only when the new one is complete). ``quantize="int8"`` (ONNX only)
    adds dynamic int8 quantisation. Returns ``output``.

    Raises ExportError for a format or option that does not fit the checkpoint, CheckpointError
    for a checkpoint that does not load, ImportError when the format's optional package is missing.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize must be int8, got {quantize!r}")
    if quantize and fmt != "onnx":
        raise ExportError(f"--quantize int8 is for --format onnx only, not {fmt}")
    loaded = load_checkpoint(checkpoint, "cpu")
    if fmt == "hf-dpr":
        reason = hf_dpr_refusal(loaded)
        if reason:
            raise ExportError(f"{checkpoint}: cannot be exported as hf-dpr: {reason}")
    output = Path(output)
    with atomic_directory(output) as tmp:
        (tmp / "README.md").write_text(model_card(loaded, fmt, quantize))  # first: the ONNX checksums cover it
        if fmt == "sentence-transformers":
            write_sentence_transformers(loaded, tmp)
        elif fmt == "hf-dpr":
            write_hf_dpr(loaded, tmp)
        else:
            from .onnx_export import write_onnx

            write_onnx(loaded, tmp, quantize)
    return output


def export_tokenizer(loaded: Loaded, directory: Path, max_length: int | None = None) -> None:
    """Save the checkpoint's tokenizer into ``directory`` so that it yields ``input_ids`` and
    ``attention_mask`` only (as dpr-service encodes; see the module docstring), with
    ``model_max_length`` = ``max_length`` when given."""
    hf = loaded.tokenizer.hf
    saved = hf.model_input_names, hf.model_max_length
    hf.model_input_names = list(MODEL_INPUTS)
    hf.init_kwargs["model_input_names"] = list(MODEL_INPUTS)
    if max_length:
        hf.model_max_length = max_length
    try:
        hf.save_pretrained(directory)
    finally:
        hf.model_input_names, hf.model_max_length = saved
        hf.init_kwargs.pop("model_input_names", None)


# ----------------------------------------------------------------------------- sentence-transformers


def write_sentence_transformers(loaded: Loaded, out: Path) -> None:
    """Write a sentence-transformers directory of ``loaded`` into ``out`` (see the module docstring).
    Raises ImportError without sentence-transformers (>= 5, for ``Router`` and task prompts)."""
    try:
        from sentence_transformers import SentenceTransformer
        try:  # sentence-transformers >= 6
            from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Router, Transformer
        except ImportError:  # 5.x
            from sentence_transformers.models import Normalize, Pooling, Router, Transformer
    except ImportError as e:
        raise ImportError(f"--format sentence-transformers needs sentence-transformers >= 5 ({e})") from None
    cfg, enc = loaded.config, loaded.encoder
    staging = out / ".hf"  # plain transformers directories the Transformer modules are read from
    longest = max(cfg.query_max_length, cfg.passage_max_length)

    def transformer(model, name: str, **lengths) -> Transformer:
        model.save_pretrained(staging / name, safe_serialization=True)
        export_tokenizer(loaded, staging / name, lengths.get("max_seq_length", longest))
        return Transformer(str(staging / name), **lengths)

    def pooling() -> Pooling:
        return Pooling(enc.dim, pooling_mode=cfg.pooling)

    if cfg.shared:  # without a task (plain encode()) the document length applies: max_seq_length
        modules = [transformer(enc.query_model, "shared", max_seq_length=cfg.passage_max_length,
                               query_length=cfg.query_max_length, document_length=cfg.passage_max_length), pooling()]
    else:
        modules = [Router.for_query_document(
            query_modules=[transformer(enc.query_model, "query", max_seq_length=cfg.query_max_length), pooling()],
            document_modules=[transformer(enc.passage_model, "document", max_seq_length=cfg.passage_max_length), pooling()],
        )]
    if cfg.similarity == "cosine":
        modules.append(Normalize())
    # Plain encode() is the document route (the Router's default route, the shared Transformer's
    # max_seq_length) with the passage prompt (default_prompt_name): what LangChain, TEI and Infinity
    # call on passages. With a default prompt, "query" is always listed (even empty), or encode_query
    # would fall back to the default, the passage prompt.
    prompts = {k: v for k, v in (("query", cfg.query_prompt), ("document", cfg.passage_prompt)) if v}
    if cfg.passage_prompt:
        prompts["query"] = cfg.query_prompt
    model = SentenceTransformer(modules=modules, prompts=prompts or None, device="cpu",
                                default_prompt_name="document" if cfg.passage_prompt else None,
                                similarity_fn_name="cosine" if cfg.similarity == "cosine" else "dot")
    model.save(str(out), create_model_card=False)
    shutil.rmtree(staging)


# ----------------------------------------------------------------------------- transformers' DPR classes


def hf_dpr_refusal(loaded: Loaded) -> str:
    """Why ``loaded`` cannot be exported as transformers' DPR encoders ('' when it can): their
    ``pooler_output`` is a BERT model's CLS vector with nothing added, and their tokenizers know no prompt."""
    cfg = loaded.config
    kinds = {getattr(m.config, "model_type", "?") for m in (loaded.encoder.query_model, loaded.encoder.passage_model)}
    if kinds != {"bert"}:
        return f"DPRQuestionEncoder/DPRContextEncoder wrap BERT, these encoders are {', '.join(sorted(kinds))} (use --format sentence-transformers or onnx)"
    if cfg.pooling != "cls":
        return f"DPR's pooler_output is the CLS vector, this checkpoint pools by {cfg.pooling} (use --format sentence-transformers or onnx)"
    if cfg.similarity != "dot":
        return "DPR scores by dot product of unnormalised vectors, this checkpoint by cosine (use --format sentence-transformers or onnx)"
    if cfg.query_prompt or cfg.passage_prompt:
        return "DPR's tokenizers add no prompt, this checkpoint has prompts (use --format sentence-transformers)"
    return ""


def write_hf_dpr(loaded: Loaded, out: Path) -> None:
    """Write ``question_encoder/`` and ``context_encoder/`` (model + tokenizer with the side's max
    length) for ``DPRQuestionEncoder`` / ``DPRContextEncoder``. A shared encoder is written into both.
    Call only when :func:`hf_dpr_refusal` is ''."""
    from transformers import DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    cfg, enc = loaded.config, loaded.encoder
    for name, cls, prefix, bert, length in (
        ("question_encoder", DPRQuestionEncoder, "question_encoder.bert_model.", enc.query_model, cfg.query_max_length),
        ("context_encoder", DPRContextEncoder, "ctx_encoder.bert_model.", enc.passage_model, cfg.passage_max_length),
    ):
        config = DPRConfig(**{k: v for k, v in bert.config.to_dict().items() if k in DPRConfig().to_dict()}, projection_dim=0)
        model = cls(config)
        # DPR's bert_model is a BertModel without its pooler layer: pooler_output is the CLS vector itself
        state = {prefix + k: v for k, v in bert.state_dict().items() if not k.startswith("pooler.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.endswith("position_ids")]:
            raise ExportError(f"DPR weights do not match the BERT encoder (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.eval().save_pretrained(out / name, safe_serialization=True)
        export_tokenizer(loaded, out / name, length)


# ----------------------------------------------------------------------------- model card


def training_record(checkpoint: Path) -> tuple[str, dict | None]:
    """(``train_config.yaml`` text or '', dev evaluation figures or None) of a checkpoint: the
    figures of ``eval.json`` in it (the evaluation it was selected by), else the last evaluation in
    its run's ``metrics.jsonl`` (the directory above it)."""
    config = next((p.read_text() for p in (checkpoint / "train_config.yaml", checkpoint.parent / "train_config.yaml")
                   if p.is_file()), "")
    figures = read_eval(checkpoint)
    if figures is None:
        for record in metrics_lines(checkpoint.parent / "metrics.jsonl")[0]:
            if isinstance(record.get("eval"), dict):
                figures = {"step": record.get("step"), **record["eval"]}
    return config, figures


def model_card(loaded: Loaded, fmt: str, quantize: str | None = None) -> str:
    """README.md of an export: how to load it, the encoder settings, what it was trained on and how
    it scored on its dev set (when the run had one)."""
    cfg: EncoderConfig = loaded.config
    config_text, figures = training_record(Path(loaded.path))
    config_text = without_dirs(config_text)  # a card travels: no absolute path of this machine in it
    data = [f"- {key}: `{value}`" for line in config_text.splitlines()
            for key, _, value in [line.partition(": ")] if key in ("model", "train", "dev", "train_split", "dev_split")]
    lines = [
        f"# dpr-service export ({fmt}{', ' + quantize if quantize else ''})", "",
        f"Exported by `dpr export --format {fmt}` from the checkpoint `{without_dirs(str(loaded.path))}` "
        f"(fingerprint `{loaded.fingerprint[:16]}`, base model `{without_dirs(str(loaded.base_model or 'unknown'))}`).", "",
        *([f"A query-side checkpoint (`dpr train --index`): only the query encoder was trained, against the stored "
           f"vectors of an index built by checkpoint `{loaded.passage_source[:16]}`; the passage encoder is that "
           f"checkpoint's, unchanged (passage fingerprint `{loaded.passage_fingerprint[:16]}`), so an index it built "
           f"is searched with this model's queries as it is, without re-encoding the corpus.", ""]
          if loaded.passage_source else []),
        "## Use", "", USAGE[fmt], "",
        "## Encoder", "",
        "| setting | value |", "| --- | --- |",
        *[f"| {k} | `{v!r}` |" for k, v in cfg.to_dict().items() if k != "format"],
        "", "Scores: " + ("cosine (the embeddings are L2-normalised; inner product = cosine)" if cfg.similarity == "cosine"
                          else "inner product of the embeddings") + f"; the training loss divides them by temperature {cfg.temperature}.",
        "Passages with a title are encoded as the pair `title [SEP] text` (token type 0 throughout).", "",
        "## Training data", "",
        *(data or ["Not recorded (no train_config.yaml beside the checkpoint): a starting model, or a run from elsewhere."]), "",
        "## Dev evaluation", "",
    ]
    if figures:
        lines += ["| measure | value |", "| --- | --- |",
                  *[f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in figures.items()]]
    else:
        lines.append("None recorded (the run had no dev set).")
    if config_text:
        lines += ["", "## Training configuration (train_config.yaml)", "", "```yaml", config_text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


USAGE = {
    "sentence-transformers": "```python\nfrom sentence_transformers import SentenceTransformer\n"
                             "model = SentenceTransformer(\"OUT\")\n"
                             "q = model.encode_query([\"a question\"])      # query prompt and length applied\n"
                             "p = model.encode_document([\"a passage\"])    # passage prompt and length applied\n"
                             "p = model.encode([\"a passage\"])             # the same: plain encode() is the passage route\n```",
    "hf-dpr": "```python\nfrom transformers import AutoTokenizer, DPRContextEncoder, DPRQuestionEncoder\n"
              "q_tok = AutoTokenizer.from_pretrained(\"OUT/question_encoder\")\n"
              "q_enc = DPRQuestionEncoder.from_pretrained(\"OUT/question_encoder\")\n"
              "q = q_enc(**q_tok([\"a question\"], truncation=True, padding=True, return_tensors=\"pt\")).pooler_output\n```\n"
              "(`OUT/context_encoder` likewise for passages; the tokenizers truncate at the checkpoint's max lengths.)",
    "onnx": "`query.onnx` and `passage.onnx` (or `encoder.onnx` for a shared encoder; `onnx_config.json` says which) take "
            "`input_ids` and `attention_mask` (int64, batch x sequence) and give `embedding` (batch x dim), pooled "
            "(and normalised) inside the graph; the tokenizer is in `tokenizer/`, prompts and max lengths in "
            "`onnx_config.json`. `dpr serve --runtime onnx --onnx-dir OUT` serves it.",
}

