"""What a starting model says about how it was trained, so that fine-tuning keeps it.

A sentence-transformers directory records its pooling, normalisation, max length, similarity and
prompts in small JSON files; training it with DPR's defaults instead (CLS pooling, dot product,
temperature 1) fights what it learnt (measured here on SciFact: 0.601 nDCG@10 after training vs
0.645 before). :func:`infer_encoder_settings` reads those files:

=========================================  ===============================================
file                                       setting
=========================================  ===============================================
``1_Pooling/config.json``                  ``pooling`` (``pooling_mode_cls_token`` / ``_mean_tokens``)
``modules.json`` (a ``Normalize`` module)  ``similarity = cosine``
``config_sentence_transformers.json``      ``similarity_fn_name`` (cosine, dot), ``prompts``
``sentence_bert_config.json``              ``query_length``, ``document_length`` (sentence-transformers
                                           >= 6, when set), else ``max_seq_length`` (both max lengths)
``tokenizer_config.json``                  ``model_max_length``, where sentence-transformers >= 6
                                           keeps max_seq_length (both, unless given per task)
``modules.json`` (one Transformer)         ``shared`` encoder
=========================================  ===============================================

and, for cosine similarity, ``temperature = 0.05`` (sentence-transformers'
MultipleNegativesRankingLoss scale of 20; e5 and bge fine-tune at 0.01-0.05). A dpr-service
checkpoint keeps its own ``dpr_config.json``; any other transformers model gets DPR's settings
(Karpukhin et al. 2020: two encoders, CLS pooling, dot product, 64/256 tokens).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .config import EncoderConfig
from .errors import first_line

log = logging.getLogger(__name__)

COSINE_TEMPERATURE = 0.05
DPR_DEFAULTS = EncoderConfig()  # cls, dot, temperature 1, 64 / 256 tokens, two encoders, no prompts
SETTINGS = ("pooling", "similarity", "temperature", "query_max_length", "passage_max_length", "shared",
            "query_prompt", "passage_prompt")


class ModelDirError(ValueError):
    """The starting model is not a usable model directory; the message says why."""


@dataclass
class Inferred:
    """Encoder settings read from a model directory: ``values[name]`` came from ``sources[name]``."""

    kind: str  # "dpr-service checkpoint", "sentence-transformers" or "transformers"
    values: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # setting -> why the model's value cannot be used
    notes: list = field(default_factory=list)  # things the log should say

    def set(self, name: str, value, source: str) -> None:
        """Record a setting's value and the file (or rule) it came from."""
        self.values[name] = value
        self.sources[name] = source


def check_model_dir(path: str | Path) -> Path:
    """The local directory holding ``path``'s configuration: ``path`` itself (``~`` expanded), or, for a
    Hugging Face Hub id (``bert-base-uncased``, ``org/name``), a snapshot of its JSON files from the
    Hub or, offline, from the local Hugging Face cache.

    Raises ModelDirError, before any data is read, for a path that does not exist (and is no
    reachable Hub id), or a directory that is neither a transformers model (``config.json``) nor a
    dpr-service checkpoint (``dpr_config.json``).
    """
    text = str(path)
    p = Path(text).expanduser()
    if not p.exists():
        looks_like_a_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
        if looks_like_a_path:
            raise ModelDirError(f"{path}: no such directory")
        p = _hub_snapshot(text)
    if not p.is_dir():
        raise ModelDirError(f"{path}: not a directory (a model is a directory with config.json and weights)")
    if not (p / "config.json").is_file() and not (p / "dpr_config.json").is_file():
        raise ModelDirError(f"{path}: not a transformers model directory (no config.json) nor a dpr-service "
                            "checkpoint (no dpr_config.json)")
    return p


def _hub_snapshot(repo_id: str) -> Path:
    """The JSON files of a Hub model (config and sentence-transformers files), cached by huggingface_hub."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=["*.json", "*/*.json"]))
    except Exception as e:  # offline without a cached copy, unknown id, no network: one line either way
        raise ModelDirError(f"{repo_id}: no such directory, and not a Hugging Face Hub model that could be "
                            f"reached ({first_line(e)})") from None


def _read_json(path: Path, kind: type = dict):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, kind):
        raise ModelDirError(f"{path}: expected a JSON {'object' if kind is dict else 'array'}, got {type(data).__name__}")
    return data


SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")


def _pooling(cfg: dict) -> str | None:
    """cls or mean from a Pooling config: sentence-transformers >= 5 writes ``"pooling_mode": "mean"``,
    older versions one boolean per mode (``pooling_mode_mean_tokens``). None for other modes."""
    mode = cfg.get("pooling_mode")
    if isinstance(mode, str):
        return {"mean": "mean", "cls": "cls"}.get(mode)
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    return None


def infer_encoder_settings(path: str | Path) -> Inferred:
    """The encoder settings a model implies (see the module docstring); a plain transformers model
    gives DPR's. A setting this encoder cannot reproduce (max pooling, a prompt left out of pooling)
    is recorded in ``Inferred.errors``: :func:`resolve_encoder_config` raises for it unless the
    setting is given. Raises ModelDirError for unreadable files and for modules it cannot run
    (Dense, Router/Asym, ...), whose embeddings would silently differ from the model's own."""
    p = check_model_dir(path)
    if (p / "dpr_config.json").is_file():
        raw = _read_json(p / "dpr_config.json")
        try:
            config = EncoderConfig.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise ModelDirError(f"{p / 'dpr_config.json'}: {e}") from None
        out = Inferred("dpr-service checkpoint")
        for name in SETTINGS:
            out.set(name, getattr(config, name), "dpr_config.json")
        return out
    if not (p / "modules.json").is_file():
        out = Inferred("transformers")
        for name in SETTINGS:
            out.set(name, getattr(DPR_DEFAULTS, name), "DPR's defaults")
        return _fit_positions(out, p)

    out = Inferred("sentence-transformers")
    modules = _read_json(p / "modules.json", list)
    if not all(isinstance(m, dict) for m in modules):
        raise ModelDirError(f"{p / 'modules.json'}: expected a list of module objects")
    types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unsupported = [f"{m.get('path') or m.get('name')} ({m.get('type')})" for m, t in zip(modules, types) if t not in SUPPORTED_MODULES]
    if unsupported or types.count("Transformer") != 1:
        raise ModelDirError(f"{p / 'modules.json'}: only a Transformer with Pooling and Normalize can be reproduced here; "
                            f"{', '.join(unsupported) or 'not exactly one Transformer'} would make embeddings differ "
                            "from the model's own (asymmetric Router/Asym models are not supported either)")
    out.set("shared", True, "modules.json (one Transformer)")
    pooling_dirs = [m.get("path", "") for m, t in zip(modules, types) if t == "Pooling"]
    pool_cfg = _read_json(p / pooling_dirs[0] / "config.json") if pooling_dirs else {}
    if pooling_dirs:
        pooling = _pooling(pool_cfg)
        where = f"{pooling_dirs[0]}/config.json"
        if pooling is None:
            mode = pool_cfg.get("pooling_mode") or sorted(k for k, v in pool_cfg.items() if k.startswith("pooling_mode") and v)
            out.errors["pooling"] = f"{p / where}: pooling {mode!r} is not supported (cls or mean); pass --pooling to choose one"
        out.set("pooling", pooling, where)
    else:
        out.set("pooling", "cls", "modules.json (no Pooling module)")
    st_config = _read_json(p / "config_sentence_transformers.json") if (p / "config_sentence_transformers.json").is_file() else {}
    fn = st_config.get("similarity_fn_name")
    if any(t == "Normalize" for t in types):
        similarity, sim_source = "cosine", "modules.json (Normalize module)"
    elif fn in ("cosine", "dot"):
        similarity, sim_source = fn, "config_sentence_transformers.json (similarity_fn_name)"
    elif fn is None:
        similarity, sim_source = "cosine", "sentence-transformers' default (no Normalize module, no similarity_fn_name)"
    else:
        similarity, sim_source = None, "config_sentence_transformers.json (similarity_fn_name)"
        out.errors["similarity"] = f"similarity_fn_name {fn!r} is not supported (cosine or dot); pass --similarity"
    out.set("similarity", similarity, sim_source)
    if similarity == "cosine":
        out.set("temperature", COSINE_TEMPERATURE, f"cosine similarity ({sim_source})")
    else:
        out.set("temperature", 1.0, f"dot product ({sim_source})")
    _read_lengths(out, p)
    _read_prompts(out, st_config, pool_cfg.get("include_prompt") is False)
    return _fit_positions(out, p)


def _is_length(value) -> bool:
    """A token count a model can mean: a positive int below transformers' "no limit" sentinel (1e30)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**9


def _read_lengths(out: Inferred, p: Path) -> None:
    """Query and passage max lengths of a sentence-transformers directory: the per-task
    ``query_length`` / ``document_length`` of ``sentence_bert_config.json`` (sentence-transformers >= 6
    writes them when set), else its ``max_seq_length`` (up to 5), else the tokenizer's
    ``model_max_length`` (``tokenizer_config.json``: where sentence-transformers >= 6 keeps
    max_seq_length, and what every version falls back to), else DPR's defaults."""
    sbert = _read_json(p / "sentence_bert_config.json") if (p / "sentence_bert_config.json").is_file() else {}
    length, source = sbert.get("max_seq_length"), "sentence_bert_config.json (max_seq_length)"
    if not _is_length(length):
        tokenizer = _read_json(p / "tokenizer_config.json") if (p / "tokenizer_config.json").is_file() else {}
        length, source = tokenizer.get("model_max_length"), "tokenizer_config.json (model_max_length)"
    for name, key in (("query_max_length", "query_length"), ("passage_max_length", "document_length")):
        if _is_length(sbert.get(key)):
            out.set(name, sbert[key], f"sentence_bert_config.json ({key})")
        elif _is_length(length):
            out.set(name, length, source)
        else:
            out.set(name, getattr(DPR_DEFAULTS, name), "DPR's defaults")


def _read_prompts(out: Inferred, st_config: dict, prompt_left_out: bool) -> None:
    """Query and passage prompts from ``config_sentence_transformers.json``'s ``prompts`` (query;
    passage, document or corpus); an error for a prompt that mean pooling leaves out
    (``include_prompt: false``), a note when the prompts have other names."""
    prompts = st_config.get("prompts") if isinstance(st_config.get("prompts"), dict) else {}
    query_prompt = prompts.get("query", "")
    passage_prompt = next((prompts[k] for k in ("passage", "document", "corpus") if k in prompts), "")
    if set(prompts) - {"query", "passage", "document", "corpus"} and not (query_prompt or passage_prompt):
        out.notes.append(f"config_sentence_transformers.json has prompts {sorted(prompts)} but none named query, "
                         "passage, document or corpus: none is used; pass --query-prompt / --passage-prompt")
    for name, value in (("query_prompt", query_prompt), ("passage_prompt", passage_prompt)):
        out.set(name, value if isinstance(value, str) else "", "config_sentence_transformers.json (prompts)")
        if value and prompt_left_out and out.values["pooling"] == "mean":
            out.errors[name] = ("the Pooling config's include_prompt false (the prompt's tokens are left out of mean "
                                "pooling) is not supported; pass --query-prompt '' --passage-prompt '' to train without prompts")


def _fit_positions(out: Inferred, p: Path | None) -> Inferred:
    """Cap inferred max lengths at the model's ``max_position_embeddings`` (config.json)."""
    config = p / "config.json" if p is not None else None
    positions = _read_json(config).get("max_position_embeddings") if config is not None and config.is_file() else None
    if isinstance(positions, int) and positions >= 2:
        for name in ("query_max_length", "passage_max_length"):
            if out.values[name] > positions:
                out.set(name, positions, f"config.json (max_position_embeddings; {out.sources[name]} said {out.values[name]})")
    return out


def resolve_encoder_config(model: str | Path, given: dict) -> tuple[EncoderConfig, dict]:
    """The encoder config for starting from ``model``: each setting in ``given`` (not None) wins;
    the rest come from :func:`infer_encoder_settings`. Returns the config and, per setting, where
    its value came from ("given" or a file name). Raises ModelDirError or ValueError (bad values)."""
    inferred = infer_encoder_settings(model)
    values, sources = {}, {}
    for name in SETTINGS:
        if given.get(name) is not None:
            values[name], sources[name] = given[name], "given"
        elif name in inferred.errors:
            raise ModelDirError(inferred.errors[name])
        else:
            values[name], sources[name] = inferred.values[name], inferred.sources[name]
    if given.get("temperature") is None and given.get("similarity") is not None:
        # a similarity chosen by hand takes its own temperature, not the model's
        values["temperature"] = COSINE_TEMPERATURE if values["similarity"] == "cosine" else 1.0
        sources["temperature"] = f"{values['similarity']} similarity (given)"
    for note in inferred.notes:
        log.warning("%s: %s", model, note)
    return EncoderConfig(**values), {"kind": inferred.kind, **sources}
