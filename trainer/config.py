"""The training configuration: defaults, then a YAML file, then command-line flags.

The effective configuration is saved as ``train_config.yaml`` in the output directory and in every
checkpoint, and ``--resume`` refuses to continue with settings that would change the run.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from dpr_service.core.config import EncoderConfig, EncoderConfigError
from dpr_service.core.device import PRECISIONS


METRICS = {"dev_nll", "ndcg@10", "mrr@10", *(f"recall@{k}" for k in (1, 5, 20, 100)),
           *(f"top{k}_accuracy" for k in (1, 5, 20, 100))}


class ConfigError(Exception):
    """A bad setting; the message names the file (and line) or the flag."""


@dataclass
class TrainConfig:
    # what to train, on what, and where to write it
    """Every setting of a training run. The YAML file and the flags use these names, with the encoder's
    settings flat beside them (``pooling``, ``shared_encoder``...: :data:`ENCODER_SETTINGS`); build one
    from flat settings with :meth:`from_settings`. Encoder settings not given come from the starting
    model (:func:`resolve_encoder`)."""
    model: str = ""  # a local transformers model directory or a hub id
    train: str = ""  # DPR JSON/JSONL, plain JSONL, or a BEIR directory
    dev: str | None = None
    output: str = ""
    train_split: str = "train"  # qrels split for a BEIR --train directory
    dev_split: str = "dev"  # qrels split for a BEIR --dev directory
    # the encoder (saved with the checkpoint as dpr_config.json): the EncoderConfig fields the user set
    # (flat in the YAML file and the flags: ENCODER_SETTINGS); resolve_encoder fills in the rest from the
    # starting model (dpr_service/core/pretrained.py: a sentence-transformers directory's own pooling,
    # similarity, lengths and prompts; a dpr-service checkpoint's config; DPR's settings for any other model)
    encoder: dict = dataclasses.field(default_factory=dict)
    # the data: negatives, positives, run length
    negatives: str = "auto"  # auto, given, random, bm25 or model
    pairs: str = "sample"  # sample: one positive per question per epoch; all: every (question, positive) pair
    mine_depth: int = 50  # mined negatives come from this many top-ranked passages
    mine_ratio: float = 0.95  # a mined negative scores below this share of the positive's score (NV-Retriever)
    remine_every: int | None = None  # epochs between re-mining rounds with the model being trained (ANCE)
    # query-side training against a fixed index (trainer/query_side.py; ADORE): the query encoder alone trains
    index: str | None = None  # an index artifact built by --model's passage encoder: its vectors are the passage side
    index_negatives: int = 32  # each step, this many top passages of the whole index per question are its negatives
    index_loss: str = "topk"  # topk: those negatives, shared across the batch; corpus: the exact NLL over every passage
    # the optimisation (DPR's defaults where DPR has one)
    batch_size: int = 32
    hard_negatives: int = 1
    chunk_size: int | None = None  # gradient caching: encode the batch in chunks of this many texts
    max_steps: int | None = None  # wins over epochs when given
    epochs: float | None = None  # None: from the data size (default_epochs)
    lr: float | None = None  # None: DEFAULT_LR (DPR's 2e-5), or DEFAULT_LORA_LR with --lora-r (see resolve_defaults)
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None  # wins over warmup_ratio when given
    max_grad_norm: float = 2.0
    seed: int = 42
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: stop with an error, or skip the step and count it
    # LoRA adapters (Hu et al. 2021; dpr_service/core/lora.py) instead of full fine-tuning: --lora-r turns
    # them on; the other three are None unless given (resolve_defaults fills them in)
    lora_r: int | None = None  # the rank of each adapter
    lora_alpha: float | None = None  # the update is scaled by alpha / r; None: alpha = r (scale 1, as Hu et al.)
    lora_dropout: float | None = None  # dropout on each adapter's input; None: 0.1 (Tevatron's LoRA retrievers)
    lora_targets: str | None = None  # comma-separated module names; None: the model family's attention projections
    # the machine
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; fp16 uses a gradient scaler
    num_workers: int = 0  # DataLoader workers building and tokenising batches
    length_buckets: int = 1  # encode a batch as N length-sorted buckets, each padded on its own
    # evaluation, checkpoints, logs
    eval_every: int = 500
    eval_before: bool = False  # evaluate the starting model too (a baseline at step 0)
    eval_batch_size: int = 128
    best_metric: str = "ndcg@10"  # or mrr@10, recall@k, top{k}_accuracy, dev_nll (lower is better)
    save_every: int = 500
    log_every: int = 10
    progress: bool = True
    resume: bool = False
    auto_resume: bool = False  # resume when --output holds a resumable run, start one otherwise
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of this invocation

    @classmethod
    def from_settings(cls, **settings) -> "TrainConfig":
        """A config from flat settings as the YAML file and the flags name them (``pooling="mean"``,
        ``shared_encoder=True``, ``lr=3e-5``...); encoder settings that are None count as not given."""
        encoder = {ENCODER_SETTINGS[k]: settings.pop(k) for k in list(settings) if k in ENCODER_SETTINGS}
        return cls(**settings, encoder={k: v for k, v in encoder.items() if v is not None})

    def encoder_config(self) -> EncoderConfig:
        """The resolved encoder config; raises ConfigError before :func:`resolve_encoder` has filled it in."""
        missing = [flag for flag, name in ENCODER_SETTINGS.items() if name not in self.encoder]
        if missing:
            raise ConfigError(f"encoder settings not resolved yet: {', '.join(missing)}")
        return EncoderConfig(**self.encoder)

    def validate(self) -> "TrainConfig":
        """Check every setting on its own (required ones present, numbers in range, names known);
        returns self. Raises ConfigError naming the flag. Encoder settings left None are checked
        once the starting model has filled them in (:func:`resolve_encoder`)."""
        for name in ("model", "train", "output"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required (on the command line or in the config file)")
        positive_ints = ["batch_size", "length_buckets", "eval_every", "eval_batch_size", "save_every", "log_every"]
        for name in positive_ints + ["max_steps", "stop_after", "chunk_size"]:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{_flag(name)} must be a positive integer, got {value!r}")
        for name in ("hard_negatives", "num_workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.batch_size < 2:
            raise ConfigError("--batch-size must be at least 2: in-batch negatives need other questions")
        self._validate_upper_bounds()
        for name in ("train_split", "dev_split"):
            check_split_name(getattr(self, name), _flag(name))
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"--epochs must be > 0, got {self.epochs!r}")
        for name, allowed in (("negatives", NEGATIVES), ("pairs", PAIRS), ("on_nonfinite", ("stop", "skip"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("mine_depth", "remine_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{_flag(name)} must be a positive integer, got {value!r}")
        if not 0 < self.mine_ratio <= 1:
            raise ConfigError(f"--mine-ratio must be in (0, 1], got {self.mine_ratio!r}")
        if self.index_loss not in INDEX_LOSSES:
            raise ConfigError(f"--index-loss must be one of {', '.join(INDEX_LOSSES)}, got {self.index_loss!r}")
        if not isinstance(self.index_negatives, int) or self.index_negatives < 1:
            raise ConfigError(f"--index-negatives must be a positive integer, got {self.index_negatives!r}")
        if self.index is None and (self.index_loss != "topk" or self.index_negatives != 32):
            raise ConfigError(f"--index-loss and --index-negatives apply with --index only (query-side training)")
        if self.index is not None:
            if self.remine_every is not None:
                raise ConfigError("--remine-every does not apply with --index: the negatives come from the index "
                                  "with the current query encoder at every step")
            if self.chunk_size is not None:
                raise ConfigError("--chunk-size does not apply with --index: only questions are encoded (no passage "
                                  "forward pass to cache); lower --batch-size if memory is short")
        if self.remine_every is not None and self.negatives == "given":
            raise ConfigError("--remine-every mines new negatives with the model: use it with --negatives model (or auto)")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr!r}")
        self._validate_lora()
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.best_metric not in METRICS:
            raise ConfigError(f"--best-metric must be one of {', '.join(sorted(METRICS))}, got {self.best_metric!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        unknown = set(self.encoder) - set(ENCODER_SETTINGS.values())
        if unknown:
            raise ConfigError(f"unknown encoder settings {sorted(unknown)}")
        try:  # the given settings alone (the model fills the rest in at the start of training)
            EncoderConfig(**self.encoder)
        except EncoderConfigError as e:
            raise ConfigError(f"{_flag(ENCODER_FLAGS[e.field])} {e.problem}") from None
        return self

    def _validate_upper_bounds(self) -> None:
        """Every number has a ceiling (:data:`UPPER_BOUNDS`; ``num_workers`` at most this machine's CPUs):
        a run of 1e30 steps or 16 loader workers on 2 cores is a mistake, and on the training service a
        way to exhaust the server. Also the lower bounds the checks above leave out (seed, rates)."""
        encoder = {flag: self.encoder.get(key) for flag, key in ENCODER_SETTINGS.items()}
        for name, (low, high) in UPPER_BOUNDS.items():
            value = encoder[name] if name in encoder else getattr(self, name)
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # absent, or a wrong type the checks above or EncoderConfig name
            if not low <= value <= high:
                raise ConfigError(f"{_flag(name)} must be in [{low:g}, {high:g}], got {value!r}")
        cpus = usable_cpus()
        if isinstance(self.num_workers, int) and self.num_workers > cpus:
            raise ConfigError(f"--num-workers must be at most {cpus} (the CPUs this process may use), "
                              f"got {self.num_workers!r}")
        for name in ("query_prompt", "passage_prompt", "lora_targets"):
            value = encoder[name] if name in encoder else getattr(self, name)
            if isinstance(value, str) and len(value) > MAX_TEXT_SETTING:
                raise ConfigError(f"{_flag(name)} must be at most {MAX_TEXT_SETTING} characters, got {len(value)}")

    def _validate_lora(self) -> None:
        if self.lora_r is None:
            given = [name for name in ("lora_alpha", "lora_dropout", "lora_targets") if getattr(self, name) is not None]
            if given:
                raise ConfigError(f"{_flag(given[0])} needs --lora-r (the adapters' rank): LoRA is off without it")
            return
        if not isinstance(self.lora_r, int) or isinstance(self.lora_r, bool) or self.lora_r < 1:
            raise ConfigError(f"--lora-r must be a positive integer, got {self.lora_r!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"--lora-alpha must be > 0, got {self.lora_alpha!r}")
        if self.lora_dropout is not None and not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.lora_targets is not None and not all(self.lora_targets.split(",")):
            raise ConfigError(f"--lora-targets must be comma-separated module names (e.g. query,key,value), "
                              f"got {self.lora_targets!r}")

    def resolve_defaults(self) -> "TrainConfig":
        """The config with the defaults that depend on other settings filled in: ``lr`` (DEFAULT_LR, or
        DEFAULT_LORA_LR with --lora-r: adapters start at zero and need a larger step), and with
        --lora-r ``lora_alpha`` (= r) and ``lora_dropout`` (0.1). ``lora_targets`` stays None when not
        given: the model decides it (:func:`dpr_service.core.lora.default_targets`)."""
        lora = self.lora_r is not None
        return dataclasses.replace(
            self, lr=self.lr if self.lr is not None else DEFAULT_LORA_LR if lora else DEFAULT_LR,
            lora_alpha=self.lora_alpha if self.lora_alpha is not None or not lora else float(self.lora_r),
            lora_dropout=self.lora_dropout if self.lora_dropout is not None or not lora else 0.1)

    def settings(self) -> dict:
        """The flat settings (:meth:`from_settings` of them gives this config back); encoder settings
        not given are None."""
        data = {}
        for name, value in dataclasses.asdict(self).items():
            if name == "encoder":
                data.update({flag: value.get(key) for flag, key in ENCODER_SETTINGS.items()})
            else:
                data[name] = value
        return data

    def to_yaml(self) -> str:
        """The flat settings as YAML (train_config.yaml), without the per-invocation ones (resume,
        auto_resume, stop_after)."""
        data = self.settings()
        for name in ("resume", "auto_resume", "stop_after"):
            data.pop(name)
        return yaml.safe_dump(data, sort_keys=False)


NEGATIVES = ("auto", "given", "random", "bm25", "model")
INDEX_LOSSES = ("topk", "corpus")
# [low, high] of every numeric setting (flat names). The ceilings are far above any sensible run
# (DPR trains 40 epochs of batch 128; BERT-sized encoders read at most 512 tokens) and far below what
# exhausts a machine; num_workers is bounded by the CPUs (usable_cpus), as PyTorch's DataLoader advises.
# lr costs nothing however large, so its ceiling only keeps it finite (the tests drive a run to NaN with 1e20).
UPPER_BOUNDS: dict[str, tuple[float, float]] = {
    "batch_size": (2, 65_536), "hard_negatives": (0, 256), "chunk_size": (1, 65_536), "max_steps": (1, 100_000_000),
    "epochs": (0, 100_000), "lr": (0, 1e30), "weight_decay": (0, 10.0), "adam_eps": (0, 1.0), "warmup_ratio": (0, 1),
    "warmup_steps": (0, 100_000_000), "max_grad_norm": (0, 1e6), "seed": (0, 2**32 - 1), "mine_depth": (1, 10_000), "index_negatives": (1, 100_000),
    "mine_ratio": (0, 1), "remine_every": (1, 100_000), "lora_r": (1, 4096), "lora_alpha": (0, 1e6),
    "lora_dropout": (0, 1), "num_workers": (0, 256), "length_buckets": (1, 256), "eval_every": (1, 100_000_000),
    "eval_batch_size": (1, 65_536), "save_every": (1, 100_000_000), "log_every": (1, 100_000_000),
    "stop_after": (1, 100_000_000), "temperature": (0, 1000.0), "query_max_length": (2, 32_768),
    "passage_max_length": (2, 32_768),
}
MAX_TEXT_SETTING = 10_000  # characters of a prompt or of --lora-targets
# A split is a qrels file name (qrels/<split>.tsv) inside the data set: a plain name, never a path
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_split_name(value, flag: str) -> None:
    """Refuse a split name that is not a plain name (letters, digits, ``.``, ``_``, ``-``; at most 100,
    not starting with ``.``, no ``..``): it names ``qrels/<split>.tsv``, and a path such as
    ``../../secret`` would read any ``*.tsv`` on the machine. Raises ConfigError naming ``flag``."""
    if not isinstance(value, str) or not SPLIT_NAME.fullmatch(value) or ".." in value:
        raise ConfigError(f"{flag} must be a plain split name (letters, digits, '.', '_' and '-', at most 100, "
                          f"no path separators, no '..', not hidden), got {value!r}")
DEFAULT_LR = 2e-5  # DPR's (Karpukhin et al. 2020)
# LoRA's: Hu et al. 2021 trained RoBERTa-base's adapters with 4e-4 to 5e-4 (their Table 9), 10-25x the full
# fine-tuning rate, since the update starts at zero and only a small share of the weights move
DEFAULT_LORA_LR = 5e-4
PAIRS = ("sample", "all")
# flat setting (flag, YAML key) -> EncoderConfig field, in the order the flags are listed
ENCODER_SETTINGS = {"shared_encoder": "shared", **{f.name: f.name for f in dataclasses.fields(EncoderConfig) if f.name != "shared"}}
ENCODER_FLAGS = {field: flag for flag, field in ENCODER_SETTINGS.items()}

# Settings that may differ between an interrupted run and its --resume without changing the result.
RESUME_MAY_CHANGE = {
    "dev", "dev_split", "device", "num_workers", "eval_every", "eval_before", "eval_batch_size", "save_every",
    "log_every", "progress", "resume", "auto_resume", "stop_after", "best_metric",
    "on_nonfinite",  # a run that met no non-finite step is the same under both; the stop message suggests skip
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _setting_types() -> dict[str, str]:
    """Flat setting name -> its declared type (a string such as ``"int | None"``), in the order of the flags."""
    encoder_types = {f.name: f.type for f in dataclasses.fields(EncoderConfig)}
    types = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "encoder":
            types.update({flag: f"{encoder_types[key]} | None" for flag, key in ENCODER_SETTINGS.items()})
        else:
            types[f.name] = f.type
    return types


SETTINGS = _setting_types()


def _coerce(name: str, value, where: str):
    """Check a YAML value's type against the setting's declared type."""
    kind = SETTINGS[name]
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{where}: '{name}' must not be empty")
    if kind.startswith("bool"):
        ok = isinstance(value, bool)
    elif kind.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind.startswith("float"):
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}: '{name}' must be {kind.split(' ')[0]}, got {value!r}")
    return value


MAX_DEPTH = 32  # settings are scalars (depth 1 under the top mapping); PyYAML composes recursively


def check_depth(text: str, path: Path) -> None:
    """Refuse YAML nested deeper than :data:`MAX_DEPTH` before it is composed (PyYAML's composer
    recurses: 900 levels overflow Python's stack). Reads the parser's events, which come without
    recursion. Raises ConfigError naming the file, the line and the top-level setting."""
    depth, key, want_key = 0, None, False
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    where = f"{path}:{event.start_mark.line + 1}"
                    named = f"'{key}'" if key is not None else "the settings"
                    raise ConfigError(f"{where}: {named} is nested more than {MAX_DEPTH} deep")
                want_key = want_key or (depth == 1 and isinstance(event, yaml.MappingStartEvent))
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
                want_key = depth == 1 or want_key
            elif depth == 1 and isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
                if want_key:
                    key = getattr(event, "value", None)
                want_key = not want_key
    except yaml.YAMLError:
        return  # load_yaml reports it with its line


def load_yaml(path: Path | str) -> dict:
    """Read a YAML config file; unknown keys and wrong types are errors naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    check_depth(text, path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: bad YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping of settings, got {type(data).__name__}")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if isinstance(node, yaml.MappingNode) else {}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        where = f"{path}:{lines.get(key, 1)}"
        if name not in SETTINGS or name in ("resume", "encoder"):
            raise ConfigError(f"{where}: unknown setting '{key}'")
        out[name] = _coerce(name, value, where)
    return out


PATH_SETTINGS = ("model", "train", "dev", "output")


def resolve_encoder(cfg: TrainConfig, checkpoint: Path | None = None) -> tuple[TrainConfig, dict]:
    """Fill the encoder settings left None: from ``checkpoint`` (the run being resumed) when given,
    else from the starting model (:func:`dpr_service.core.pretrained.resolve_encoder_config`).
    Returns the resolved config and where each setting came from (by flat setting name, plus "kind"). Raises ConfigError for a
    ``--model`` that is not a model directory (before any data is read) or for bad values."""
    from dpr_service.core.pretrained import ModelDirError, resolve_encoder_config

    source = checkpoint if checkpoint is not None else cfg.model
    try:
        config, sources = resolve_encoder_config(source, cfg.encoder)
    except ModelDirError as e:
        raise ConfigError(f"--model {e}" if checkpoint is None else str(e)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    kind = sources.pop("kind")
    return (dataclasses.replace(cfg, encoder=dataclasses.asdict(config)),
            {"kind": kind, **{ENCODER_FLAGS[k]: v for k, v in sources.items()}})


def _same_setting(name: str, saved, now) -> bool:
    """Paths compare resolved (``./data/x`` is ``data/x``); files compare by content when both exist."""
    if saved == now:
        return True
    if name in PATH_SETTINGS and isinstance(saved, str) and isinstance(now, str):
        a, b = Path(saved).expanduser().resolve(), Path(now).expanduser().resolve()
        if a == b:
            return True
        if a.is_file() and b.is_file() and a.stat().st_size == b.stat().st_size:
            return a.read_bytes() == b.read_bytes()
    return False


def check_resume_config(cfg: TrainConfig, saved_path: Path) -> None:
    """Refuse a --resume whose settings would change the run (RESUME_MAY_CHANGE lists those that may
    differ); raises ConfigError naming each changed setting, CheckpointError for an unreadable file."""
    from dpr_service.core.checkpoint import CheckpointError

    try:
        saved = yaml.safe_load(Path(saved_path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{saved_path}: cannot read the interrupted run's config ({e})") from None
    now = yaml.safe_load(cfg.to_yaml())
    changed = [k for k in now if k not in RESUME_MAY_CHANGE and not _same_setting(k, saved.get(k), now[k])]
    if changed:
        diffs = "; ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(f"--resume with settings that differ from the interrupted run ({diffs})")


def saved_config(output: str) -> Path | None:
    """The config an interrupted run in ``output`` was started with (``last/train_config.yaml``), if any:
    ``dpr train --output RUN --resume`` continues from it without repeating the other settings."""
    path = Path(output) / "last" / "train_config.yaml"
    return path if path.is_file() else None


def build_config(cli: dict, config_file: str | None = None) -> TrainConfig:
    """Defaults < the YAML file < flags given on the command line (``cli`` holds only those)."""
    values = load_yaml(config_file) if config_file else {}
    values.update(cli)
    return TrainConfig.from_settings(**values).validate()
