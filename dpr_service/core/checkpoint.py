"""Checkpoint I/O: one writer and one loader for every consumer (trainer, index builder, server).

Layout of a checkpoint directory::

    dpr_config.json      EncoderConfig + base_model + fingerprint (sha256 of config and weights)
                         + passage_fingerprint (the passage side alone: :func:`passage_fingerprint`)
                         + passage_source (a query-side checkpoint only: the fingerprint of the
                         checkpoint whose passage encoder it keeps, ``dpr train --index``)
    query_encoder/       save_pretrained: config.json + model.safetensors (plain transformers loads it)
    passage_encoder/     the same; absent when the encoder is shared (then query_encoder/ is both)
    tokenizer/           save_pretrained of the tokenizer
    (lora.json)          a LoRA checkpoint only: its base model (path and fingerprint); the encoder
                         directories then hold adapters (adapter_config.json + adapter_model.safetensors)
    (training_state/)    written by the trainer only, for --resume; ignored here
    checksums.json       sha256 of every other file, written when the directory is committed

Weights are safetensors only; nothing is pickled. A directory is written beside its final place
and renamed into it when complete (:func:`atomic_directory`), so a kill never leaves a half-written
checkpoint where a reader would take it for a whole one. Loading checks every file against
``checksums.json`` first, so a damaged file is named before transformers or torch read it.

A LoRA checkpoint (``dpr train --lora-r``; :mod:`dpr_service.core.lora`) holds only the adapters and
names its base model by path and fingerprint (:func:`base_fingerprint`); :func:`load_checkpoint`
loads the base, refuses it when its fingerprint differs (naming both), adds the adapters and, unless
asked not to, merges them into the weights, so every consumer gets a plain bi-encoder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from huggingface_hub.utils import disable_progress_bars as disable_hub_progress_bars
from transformers.utils import logging as hf_logging

from . import fsio
from .config import FORMAT, EncoderConfig
from .artifact import EncoderIdentity
from .encoder import BiEncoder
from .errors import first_line
from .fsio import recover_directory, sha256_file  # noqa: F401  (re-exported: trainer/ and index/ import them from here)
from .tokenize import TextTokenizer

log = logging.getLogger(__name__)
hf_logging.disable_progress_bar()  # per-file "Loading weights" bars; our own bars show the long work
disable_hub_progress_bars()  # "Writing model shards" on every save

CONFIG_FILE = "dpr_config.json"
CHECKSUMS_FILE = "checksums.json"
QUERY_DIR, PASSAGE_DIR, TOKENIZER_DIR = "query_encoder", "passage_encoder", "tokenizer"
LORA_FILE = "lora.json"


class CheckpointError(Exception):
    """A checkpoint (or base model) that cannot be used; the message names the file and the problem."""


@dataclass
class Loaded:
    """A checkpoint loaded by :func:`load_checkpoint`: the encoders (in eval mode, on the asked
    device), the tokenizer with the checkpoint's max lengths, its config, where it was read from,
    its fingerprint (sha256 hex) and the base model it was trained from; for a LoRA checkpoint,
    also that base model's fingerprint (:func:`base_fingerprint`)."""

    encoder: BiEncoder
    tokenizer: TextTokenizer
    config: EncoderConfig
    path: Path
    fingerprint: str
    base_model: str
    base_fingerprint: str = ""
    passage_fingerprint: str = ""  # :func:`passage_fingerprint`: what an index built by this checkpoint is bound to
    passage_source: str = ""  # a query-side checkpoint's: the checkpoint its passage encoder came from

    @property
    def identity(self) -> EncoderIdentity:
        """What an index artifact checks before this checkpoint may search it
        (:func:`dpr_service.core.artifact.check_binding`)."""
        return EncoderIdentity(self.fingerprint, self.passage_fingerprint, self.passage_source)


# ----------------------------------------------------------------------------- atomic directories and checksums


def _seal(directory: Path) -> None:
    """Before a directory is committed: a checkpoint (one with ``dpr_config.json``) gets ``checksums.json``."""
    if (directory / CONFIG_FILE).is_file():
        write_checksums(directory)


def atomic_directory(target: Path | str) -> contextlib.AbstractContextManager[Path]:
    """:func:`dpr_service.core.fsio.atomic_directory` for checkpoints: yields a temporary directory
    beside ``target`` and swaps it into place when the block ends without an error (the ``.old``
    recovery rule is fsio's). A checkpoint written in it (a directory with ``dpr_config.json``) gets
    ``checksums.json`` listing the sha256 of each of its files before the swap."""
    return fsio.atomic_directory(target, before_commit=_seal)


def write_checksums(directory: Path) -> None:
    """``checksums.json``: the sha256 of every file under ``directory`` (but itself)."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): sha256_file(p)
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != CHECKSUMS_FILE}
    (directory / CHECKSUMS_FILE).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1) + "\n")


def verify_checksums(directory: Path) -> set[str]:
    """Check every file listed in ``checksums.json`` (when the checkpoint has one: checkpoints
    written before it existed have only the fingerprint); the error names the file at fault.
    Returns the names of the files checked."""
    directory = Path(directory)
    path = directory / CHECKSUMS_FILE
    if not path.is_file():
        return set()
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise TypeError("files must map names to sha256 strings")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); the checkpoint was damaged") from None
    for name, expected in files.items():
        file = directory / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise CheckpointError(f"{path}: bad file name {name!r}")
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {CHECKSUMS_FILE}); the checkpoint is incomplete")
        if sha256_file(file) != expected:
            raise CheckpointError(f"{file}: checksum does not match {CHECKSUMS_FILE} (the file was changed or truncated)")
    return set(files)


# ----------------------------------------------------------------------------- fingerprint


def _encoder_files(root: Path) -> list[Path]:
    """The files the fingerprint covers beside the config: the encoders' (weights or adapters) and
    a LoRA checkpoint's ``lora.json`` (its base model)."""
    return [f for sub in (QUERY_DIR, PASSAGE_DIR) if (root / sub).is_dir()
            for f in sorted(p for p in (root / sub).rglob("*") if p.is_file())] + \
        ([root / LORA_FILE] if (root / LORA_FILE).is_file() else [])


def _fingerprint(root: Path, config: dict) -> str:
    """sha256 over the encoder config and every file of the encoder directories, in a fixed order."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in config.items() if k != "fingerprint"}, sort_keys=True).encode())
    for f in _encoder_files(root):
        h.update(str(f.relative_to(root)).encode())
        with open(f, "rb") as fh:
            fsio.sha256_update(h, fh.read)
    return h.hexdigest()


#: the settings that decide how a passage becomes a vector (with the passage encoder's weights and
#: the tokenizer's vocabulary): what :func:`passage_fingerprint` covers
PASSAGE_SETTINGS = ("pooling", "similarity", "passage_max_length", "passage_prompt")


def passage_fingerprint(encoder: BiEncoder, tokenizer) -> str:
    """sha256 hex of everything that turns a passage into a vector: :data:`PASSAGE_SETTINGS`, the
    passage encoder's tensors (names, dtypes, shapes, bytes) and the tokenizer's vocabulary.

    An index artifact is bound to it (as ``passage_fingerprint`` in its manifest), so any checkpoint
    whose passage side is the same (a query encoder trained against the index by ``dpr train
    --index``, or the very checkpoint that built it) may search that index without re-encoding the
    corpus. It hashes tensors, not files, so a shared encoder and a separate copy of it agree.
    ``tokenizer`` is a :class:`~dpr_service.core.tokenize.TextTokenizer` or a transformers tokenizer.
    About 0.3 s for MiniLM's 22M parameters on a 2-core CPU."""
    h = hashlib.sha256(json.dumps({k: getattr(encoder.config, k) for k in PASSAGE_SETTINGS}, sort_keys=True).encode())
    for name, tensor in sorted(encoder.passage_model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    hf = getattr(tokenizer, "hf", tokenizer)
    h.update(json.dumps(sorted(hf.get_vocab().items())).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- write


def write_checkpoint(directory: Path, encoder: BiEncoder, tokenizer: TextTokenizer, base_model: str = "",
                     base_fingerprint: str = "", passage_source: str = "") -> str:
    """Write the model part of a checkpoint into ``directory`` (normally an :func:`atomic_directory`).

    ``dpr_config.json`` records the :func:`passage_fingerprint` and, for a query encoder trained
    against an index (``passage_source``), the fingerprint of the checkpoint that built that index.

    An encoder with LoRA adapters (peft models) is written as its adapters and ``lora.json``, which
    names ``base_model`` (a local directory) and ``base_fingerprint`` (:func:`base_fingerprint` of it;
    required then). Returns the fingerprint. Raises CheckpointError, writing nothing, when a weight
    is NaN or infinite: a diverged model is never saved; ValueError for adapters without a base.
    """
    directory = Path(directory)
    if not is_finite(encoder):
        raise CheckpointError(f"{directory}: not written, the weights are not finite (NaN or inf): the run diverged")
    models = [(QUERY_DIR, encoder.query_model)] + ([] if encoder.config.shared else [(PASSAGE_DIR, encoder.passage_model)])
    if has_adapters(encoder):
        from . import lora

        if not (base_model and base_fingerprint):
            raise ValueError("a LoRA checkpoint needs its base model's path and fingerprint")
        for sub, model in models:
            if lora.is_adapted(model):
                lora.save_adapters(model, directory / sub)
            else:  # a query-side LoRA run's passage encoder (dpr train --index): the index's, stored whole
                model.save_pretrained(directory / sub, safe_serialization=True)
        (directory / LORA_FILE).write_text(json.dumps({"base_model": base_model, "base_fingerprint": base_fingerprint},
                                                      indent=2) + "\n")
    else:
        for sub, model in models:
            model.save_pretrained(directory / sub, safe_serialization=True)
    tokenizer.hf.save_pretrained(directory / TOKENIZER_DIR)
    meta = {**encoder.config.to_dict(), "base_model": base_model,
            "passage_fingerprint": passage_fingerprint(encoder, tokenizer)}
    if passage_source:
        meta["passage_source"] = passage_source
    fingerprint = _fingerprint(directory, meta)
    (directory / CONFIG_FILE).write_text(json.dumps({**meta, "fingerprint": fingerprint}, indent=2) + "\n")
    return fingerprint


def has_adapters(encoder: BiEncoder) -> bool:
    """True when the encoder's models carry LoRA adapters (peft models: ``dpr train --lora-r``)."""
    peft = sys.modules.get("peft")  # never imported: no peft model can exist
    return peft is not None and isinstance(encoder.query_model, peft.PeftModel)


def is_finite(encoder: torch.nn.Module) -> bool:
    """True when every parameter is finite (no NaN, no inf)."""
    return all(bool(torch.isfinite(p).all()) for p in encoder.parameters())


def save_checkpoint(directory: Path | str, encoder: BiEncoder, tokenizer: TextTokenizer, base_model: str = "",
                    base_fingerprint: str = "", passage_source: str = "") -> str:
    """Atomically write a model-only checkpoint to ``directory`` (:func:`write_checkpoint`); returns its fingerprint."""
    with atomic_directory(directory) as tmp:
        return write_checkpoint(tmp, encoder, tokenizer, base_model, base_fingerprint, passage_source)


# ----------------------------------------------------------------------------- read


def read_config(directory: Path | str) -> tuple[EncoderConfig, dict]:
    """Parse and check ``dpr_config.json``; returns the config and the raw dictionary."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {directory} is not a dpr-service checkpoint")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format is {raw.get('format') if isinstance(raw, dict) else None!r}, expected {FORMAT!r}")
    try:
        return EncoderConfig.from_dict(raw), raw
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_checkpoint(directory: Path | str, device: torch.device | str = "cpu", verify: bool = True,
                    merge_adapters: bool = True) -> Loaded:
    """Load a checkpoint for inference or further training, checking that its pieces fit.

    Checks: the config parses; the encoder and tokenizer directories exist; the fingerprint
    matches the files (``verify``); the tokenizer's vocabulary fits the embedding matrix; both
    encoders have the same width; the max lengths fit the position embeddings; the weights are finite.

    A plain transformers or sentence-transformers model directory (``config.json``, no
    ``dpr_config.json``) loads too, with the settings it implies (:func:`load_model_dir`): so the
    zero-shot baseline of a starting model is ``dpr index build --checkpoint MODEL_DIR``.

    A LoRA checkpoint (``lora.json``) loads its base model from the path it names, refuses it when
    the base's :func:`base_fingerprint` is not the recorded one (naming both), and adds the adapters:
    merged into the weights (``merge_adapters``, for inference: a plain transformers model, as fast as
    the base) or kept apart and trainable (the trainer's ``--resume``).
    Raises CheckpointError naming the file at fault.
    """
    directory = Path(directory)
    if directory.is_dir() and not (directory / CONFIG_FILE).exists() and (directory / "config.json").is_file():
        return load_model_dir(directory, device)
    config, raw = read_config(directory)
    needed = [QUERY_DIR, TOKENIZER_DIR] + ([] if config.shared else [PASSAGE_DIR])
    for sub in needed:
        if not (directory / sub).is_dir():
            raise CheckpointError(f"{directory / sub}: missing from the checkpoint")
    if verify:
        checked = verify_checksums(directory)  # every file, before tokenizers, transformers or safetensors read one
        # the fingerprint re-reads the weights: needed only where checksums.json did not cover them
        # (checkpoints older than it), since both were written from the same files
        covered = CONFIG_FILE in checked and all(f.relative_to(directory).as_posix() in checked for f in _encoder_files(directory))
        if not covered and raw.get("fingerprint") != _fingerprint(directory, raw):
            raise CheckpointError(
                f"{directory}: weights do not match the fingerprint in {CONFIG_FILE} "
                "(a file was changed, truncated or copied incompletely)"
            )
    tokenizer = _load_tokenizer(directory / TOKENIZER_DIR)
    base = {}
    if (directory / LORA_FILE).is_file():
        query_model, passage_model, base = _load_with_adapters(directory, config, merge_adapters)
    else:
        query_model = _load_model(directory / QUERY_DIR, safetensors_only=True)
        passage_model = None if config.shared else _load_model(directory / PASSAGE_DIR, safetensors_only=True)
    encoder = _assemble(query_model, passage_model, tokenizer, config, str(directory))
    if not is_finite(encoder):
        raise CheckpointError(f"{directory}: the weights are not finite (NaN or inf): the run that wrote them diverged")
    encoder.to(device).eval()
    return Loaded(
        encoder=encoder,
        tokenizer=TextTokenizer.for_config(tokenizer, config),
        config=config,
        path=directory,
        fingerprint=raw.get("fingerprint", ""),
        base_model=raw.get("base_model", ""),
        base_fingerprint=base.get("base_fingerprint", ""),
        # recorded since checkpoints have it (checked with the rest by checksums.json); computed for older ones
        passage_fingerprint=str(raw.get("passage_fingerprint") or passage_fingerprint(encoder, tokenizer)),
        passage_source=str(raw.get("passage_source", "")),
    )


def base_fingerprint(path: Path | str) -> str:
    """The fingerprint a LoRA checkpoint records for its base model (sha256 hex): a dpr-service
    checkpoint's own fingerprint (from its ``dpr_config.json``), or, for a transformers model
    directory, the sha256 of its ``config.json`` and weight files (names and bytes). Raises
    CheckpointError when ``path`` is neither (a hub id has no files to fingerprint)."""
    p = Path(path).expanduser()
    if (p / CONFIG_FILE).is_file():
        return read_config(p)[1].get("fingerprint", "")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{path}: no such model directory (a LoRA checkpoint names its base model by a local path)")
    return _hash_model_files(hashlib.sha256(), p).hexdigest()


def _hash_model_files(h, directory: Path):
    """Feed ``config.json`` and the weight files of a model directory (names and bytes) to ``h``; returns it."""
    for f in sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json"):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            fsio.sha256_update(h, fh.read)
    return h


def _load_with_adapters(directory: Path, config: EncoderConfig, merge: bool):
    """A LoRA checkpoint's (query model, passage model or None, lora.json): the base model it names,
    checked by fingerprint, with the adapters of each encoder directory (merged when ``merge``)."""
    path = directory / LORA_FILE
    try:
        meta = json.loads(path.read_text())
        base, expected = meta["base_model"], meta["base_fingerprint"]
        if not (isinstance(base, str) and isinstance(expected, str)):
            raise TypeError("base_model and base_fingerprint must be strings")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    actual = base_fingerprint(base)
    if actual != expected:
        raise CheckpointError(f"{directory}: the adapters were trained on base model {base} with fingerprint {expected}, "
                              f"but {base} now has fingerprint {actual}: restore that base model (or retrain)")
    try:
        from . import lora
    except ImportError:
        raise CheckpointError(f"{directory}: a LoRA checkpoint needs the peft package "
                              "(pip install 'dpr-service[lora]')") from None
    whole = not config.shared and not (directory / PASSAGE_DIR / lora.ADAPTER_CONFIG).is_file()
    if whole:  # query-side LoRA (dpr train --index): adapters on the query encoder, the index's passage encoder whole
        base_shared = read_config(base)[0].shared if (Path(base) / CONFIG_FILE).is_file() else True
        encoder, _ = load_base_model(base, dataclasses.replace(config, shared=base_shared))
        passage = _load_model(directory / PASSAGE_DIR, safetensors_only=True).requires_grad_(False)  # it never trains
        encoder = BiEncoder(encoder.query_model, passage, config)
    else:
        encoder, _ = load_base_model(base, config)
    models = []
    for sub, model in ((QUERY_DIR, encoder.query_model), (PASSAGE_DIR, None if config.shared else encoder.passage_model)):
        if model is not None and not (whole and sub == PASSAGE_DIR):
            try:
                model = lora.load_adapters(model, directory / sub, trainable=not merge)
            except lora.LoraError as e:
                raise CheckpointError(str(e)) from None
            model = lora.merge(model) if merge else model
        models.append(model)
    return models[0], models[1], meta


def load_model_dir(directory: Path | str, device: torch.device | str = "cpu") -> Loaded:
    """A pretrained model directory as an untrained checkpoint: its encoder settings from
    :func:`dpr_service.core.pretrained.resolve_encoder_config` (a sentence-transformers directory's
    own pooling, similarity and lengths; DPR's otherwise), one model for both sides when it is a
    sentence-transformers model. Its fingerprint hashes those settings and the model's weight files,
    so an index built from it is tied to it as to any checkpoint."""
    from .pretrained import ModelDirError, resolve_encoder_config

    directory = Path(directory)
    try:
        config, _ = resolve_encoder_config(directory, {})
    except (ModelDirError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    encoder, tokenizer = load_base_model(str(directory), config)
    if not is_finite(encoder):
        raise CheckpointError(f"{directory}: the weights are not finite (NaN or inf)")
    h = _hash_model_files(hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()), directory)
    encoder.to(device).eval()
    return Loaded(encoder=encoder, tokenizer=tokenizer, config=config, path=directory, fingerprint=h.hexdigest(),
                  base_model=str(directory), passage_fingerprint=passage_fingerprint(encoder, tokenizer))


def load_base_model(name_or_path: str, config: EncoderConfig) -> tuple[BiEncoder, TextTokenizer]:
    """Start training from a pretrained model: a local transformers or sentence-transformers directory,
    a dpr-service checkpoint (its encoders, with ``config``), or, where the Hub is reachable, a hub id
    such as ``bert-base-uncased``. Separate encoders start as two copies of one model. Raises
    CheckpointError for a model that cannot be loaded or does not fit ``config``."""
    if (Path(name_or_path) / CONFIG_FILE).is_file():
        loaded = load_checkpoint(name_or_path)
        if loaded.config.shared != config.shared:
            raise CheckpointError(f"{name_or_path}: a checkpoint with {'one shared encoder' if loaded.config.shared else 'two encoders'} "
                                  f"cannot start a run with {'one' if config.shared else 'two'}")
        query_model, passage_model = loaded.encoder.query_model, None if config.shared else loaded.encoder.passage_model
        hf_tokenizer = loaded.tokenizer.hf
    else:
        hf_tokenizer = _load_tokenizer(name_or_path)
        query_model = _load_model(name_or_path)
        passage_model = None if config.shared else _load_model(name_or_path)
    encoder = _assemble(query_model, passage_model, hf_tokenizer, config, name_or_path)
    return encoder, TextTokenizer.for_config(hf_tokenizer, config)


def _load_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad directory
        raise CheckpointError(f"{path}: cannot load a tokenizer ({first_line(e)})") from None


def _load_model(path: Path | str, safetensors_only: bool = False):
    """A transformers model; a checkpoint's encoders are read from safetensors only (never a pickled
    ``pytorch_model.bin``, even one dropped beside them)."""
    try:
        AutoConfig.from_pretrained(str(path))
        return AutoModel.from_pretrained(str(path), use_safetensors=True if safetensors_only else (_has_safetensors(path) or None))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load a transformers model ({first_line(e)})") from None


def _has_safetensors(path: Path | str) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.glob("*.safetensors"))


def _assemble(query_model, passage_model, tokenizer, config: EncoderConfig, where: str) -> BiEncoder:
    vocab = len(tokenizer)
    for name, model in (("query", query_model), ("passage", passage_model)):
        if model is None:
            continue
        rows = model.get_input_embeddings().weight.shape[0]
        if vocab > rows:
            raise CheckpointError(f"{where}: tokenizer has {vocab} tokens but the {name} encoder embeds only {rows}")
        max_pos = getattr(model.config, "max_position_embeddings", None)
        longest = max(config.query_max_length, config.passage_max_length)
        if max_pos is not None and longest > max_pos:
            raise CheckpointError(f"{where}: max length {longest} exceeds the {name} encoder's {max_pos} positions")
    if passage_model is not None and passage_model.config.hidden_size != query_model.config.hidden_size:
        raise CheckpointError(
            f"{where}: query encoder width {query_model.config.hidden_size} != passage encoder width "
            f"{passage_model.config.hidden_size}"
        )
    return BiEncoder(query_model, passage_model, config)
