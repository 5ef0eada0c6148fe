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
``sentence_bert_config.json``              ``max_seq_length`` (both max lengths)
``modules.json`` (one Transformer)         ``shared`` encoder
=========================================  ===============================================

and, for cosine similarity, ``temperature = 0.05`` (sentence-transformers'
MultipleNegativesRankingLoss scale of 20; e5 and bge fine-tune at 0.01-0.05). A dpr-service
checkpoint keeps its own ``dpr_config.json``; any other transformers model gets DPR's settings
(Karpukhin et al. 2020: two encoders, CLS pooling, dot product, 64/256 tokens).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import EncoderConfig

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

    def set(self, name: str, value, source: str) -> None:
        self.values[name] = value
        self.sources[name] = source


def check_model_dir(path: str | Path) -> Path | None:
    """The model directory as a Path, or None for a Hugging Face Hub id (``org/name``).

    Raises ModelDirError, before any data is read, for a local-looking path that does not exist or
    a directory that is neither a transformers model (``config.json``) nor a dpr-service checkpoint.
    """
    p = Path(path)
    text = str(path)
    hub_offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    looks_local = p.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1 or "\\" in text or hub_offline
    if not looks_local:
        return None  # a hub id: transformers says whether it can be reached
    if not p.exists():
        raise ModelDirError(f"{path}: no such directory")
    if not p.is_dir():
        raise ModelDirError(f"{path}: not a directory (a model is a directory with config.json and weights)")
    if not (p / "config.json").is_file() and not (p / "dpr_config.json").is_file():
        raise ModelDirError(f"{path}: not a transformers model directory (no config.json) nor a dpr-service "
                            "checkpoint (no dpr_config.json)")
    return p


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path}: cannot read ({e})") from None


def infer_encoder_settings(path: str | Path) -> Inferred:
    """The encoder settings a model directory implies (see the module docstring); a hub id or a plain
    transformers directory gives DPR's. Raises ModelDirError for unreadable or unsupported files
    (e.g. max pooling, which the encoder does not implement)."""
    p = check_model_dir(path)
    if p is not None and (p / "dpr_config.json").is_file():
        raw = _read_json(p / "dpr_config.json")
        try:
            config = EncoderConfig.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise ModelDirError(f"{p / 'dpr_config.json'}: {e}") from None
        out = Inferred("dpr-service checkpoint")
        for name in SETTINGS:
            out.set(name, getattr(config, name), "dpr_config.json")
        return out
    if p is None or not (p / "modules.json").is_file():
        out = Inferred("transformers")
        for name in SETTINGS:
            out.set(name, getattr(DPR_DEFAULTS, name), "DPR's defaults")
        return _fit_positions(out, p)

    out = Inferred("sentence-transformers")
    modules = _read_json(p / "modules.json")
    types = [str(m.get("type", "")) for m in modules] if isinstance(modules, list) else []
    transformers = [t for t in types if t.endswith(".Transformer")]
    out.set("shared", len(transformers) <= 1, "modules.json")
    pooling_dirs = [m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Pooling")]
    pooling = "cls" if not pooling_dirs else None
    if pooling_dirs:
        cfg = _read_json(p / pooling_dirs[0] / "config.json")
        if cfg.get("pooling_mode_mean_tokens"):
            pooling = "mean"
        elif cfg.get("pooling_mode_cls_token"):
            pooling = "cls"
        else:
            modes = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode") and v)
            raise ModelDirError(f"{p / pooling_dirs[0] / 'config.json'}: pooling {modes} is not supported "
                                "(cls or mean); pass --pooling to choose one")
        out.set("pooling", pooling, f"{pooling_dirs[0]}/config.json")
    else:
        out.set("pooling", pooling, "modules.json (no Pooling module)")
    similarity, sim_source = "dot", "modules.json (no Normalize module)"
    if any(t.endswith(".Normalize") for t in types):
        similarity, sim_source = "cosine", "modules.json (Normalize module)"
    st_config = _read_json(p / "config_sentence_transformers.json") if (p / "config_sentence_transformers.json").is_file() else {}
    fn = st_config.get("similarity_fn_name")
    if fn in ("cosine", "dot") and not (fn == "dot" and similarity == "cosine"):
        similarity, sim_source = fn, "config_sentence_transformers.json (similarity_fn_name)"
    out.set("similarity", similarity, sim_source)
    if similarity == "cosine":
        out.set("temperature", COSINE_TEMPERATURE, f"cosine similarity ({sim_source})")
    else:
        out.set("temperature", 1.0, f"dot product ({sim_source})")
    sbert = p / "sentence_bert_config.json"
    if sbert.is_file() and isinstance(_read_json(sbert).get("max_seq_length"), int):
        length = _read_json(sbert)["max_seq_length"]
        out.set("query_max_length", length, "sentence_bert_config.json (max_seq_length)")
        out.set("passage_max_length", length, "sentence_bert_config.json (max_seq_length)")
    else:
        out.set("query_max_length", DPR_DEFAULTS.query_max_length, "DPR's defaults")
        out.set("passage_max_length", DPR_DEFAULTS.passage_max_length, "DPR's defaults")
    prompts = st_config.get("prompts") if isinstance(st_config.get("prompts"), dict) else {}
    query_prompt = prompts.get("query", "")
    passage_prompt = next((prompts[k] for k in ("passage", "document", "corpus") if k in prompts), "")
    out.set("query_prompt", query_prompt if isinstance(query_prompt, str) else "", "config_sentence_transformers.json (prompts)")
    out.set("passage_prompt", passage_prompt if isinstance(passage_prompt, str) else "", "config_sentence_transformers.json (prompts)")
    return _fit_positions(out, p)


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
        else:
            values[name], sources[name] = inferred.values[name], inferred.sources[name]
    if given.get("temperature") is None and given.get("similarity") is not None:
        # a similarity chosen by hand takes its own temperature, not the model's
        values["temperature"] = COSINE_TEMPERATURE if values["similarity"] == "cosine" else 1.0
        sources["temperature"] = f"{values['similarity']} similarity (given)"
    return EncoderConfig(**values), {"kind": inferred.kind, **sources}
