"""LoRA adapters on a bi-encoder's transformers models, with the ``peft`` library.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a pretrained
weight ``W`` (d_out, d_in) and learns a low-rank update: ``h = W x + (alpha / r) * B A x`` with
``A`` (r, d_in) and ``B`` (d_out, r), ``B`` starting at zero so training starts from the pretrained
model. The DPR loss is unchanged; only the parameters that train are.

On disk an encoder's adapters are peft's own layout (``PeftModel.from_pretrained`` reads it):
``adapter_config.json`` (peft's LoraConfig) and ``adapter_model.safetensors`` (only the ``lora_A`` /
``lora_B`` tensors). They are written and read here with safetensors directly, never through
peft's pickle fallback (``adapter_model.bin``). The checkpoint that holds them names its base model
(see :mod:`dpr_service.core.checkpoint`).

``peft`` is an optional dependency (the ``lora`` extra); importing this module without it raises
ImportError, and the checkpoint loader turns that into a one-line error.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .encoder import BiEncoder
from .errors import first_line

__all__ = ["LoraSettings", "LoraError", "default_targets", "add_adapters", "is_adapted", "is_frozen", "save_adapters",
           "load_adapters", "merge", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"

# The attention projections (query, key, value) of each model family, by ``config.model_type``:
# the default ``--lora-targets``. Families not listed fall back to peft's own table.
ATTENTION_PROJECTIONS = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "nomic_bert"),
                    ("query", "key", "value")),
    "distilbert": ("q_lin", "k_lin", "v_lin"),
    "mpnet": ("q", "k", "v"),
    "t5": ("q", "k", "v"), "mt5": ("q", "k", "v"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj"),
    "modernbert": ("Wqkv",),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), ("q_proj", "k_proj", "v_proj")),
}


class LoraError(ValueError):
    """Adapters that cannot be added or loaded (no default targets for a model family, targets that
    name no module, an adapter file that does not fit its base model); the message says which."""


@dataclass(frozen=True)
class LoraSettings:
    """The adapter hyper-parameters: rank ``r``, scale numerator ``alpha`` (the update is multiplied
    by alpha / r), ``dropout`` on the adapter's input, and ``targets``: names of the linear modules
    that get adapters (peft's ``target_modules``: a module matches when its name ends with one)."""

    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    def to_peft(self) -> LoraConfig:
        """peft's LoraConfig for these settings (no task head: the encoder's hidden states are used)."""
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.targets), bias="none")


def default_targets(model: torch.nn.Module) -> tuple[str, ...]:
    """The attention projections of ``model``'s family (:data:`ATTENTION_PROJECTIONS`, then peft's
    table of defaults). Raises LoraError for a family neither knows."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in ATTENTION_PROJECTIONS:
        return ATTENTION_PROJECTIONS[kind]
    if kind in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return tuple(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[kind])
    raise LoraError(f"no default LoRA targets for model type {kind!r}: name its attention projections")


def add_adapters(encoder: BiEncoder, settings: LoraSettings) -> BiEncoder:
    """A bi-encoder whose transformers models carry new, trainable adapters (one set for a shared
    encoder, one per encoder otherwise); every other parameter is frozen. ``A`` is initialised from
    torch's global RNG (seed it first for a reproducible run), ``B`` at zero, so the new encoder
    embeds exactly as ``encoder`` does. The models of ``encoder`` are modified in place. Raises
    LoraError when a target names no module of the model.

    A passage encoder that is frozen already (no parameter requires a gradient: query-side training,
    ``dpr train --index``, whose passage encoder is the index's) gets no adapters and stays the plain
    model it is, so its weights, and the index's passage fingerprint, stay exactly as they were."""
    wrap = lambda model: _peft(model, settings.to_peft())  # noqa: E731
    query = wrap(encoder.query_model)
    passage = None if encoder.config.shared else (
        encoder.passage_model if is_frozen(encoder.passage_model) else wrap(encoder.passage_model))
    out = BiEncoder(query, passage, encoder.config)
    out.length_buckets = encoder.length_buckets
    return out


def is_frozen(model: torch.nn.Module) -> bool:
    """True when no parameter of ``model`` requires a gradient (and it has parameters)."""
    params = list(model.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def is_adapted(model: torch.nn.Module) -> bool:
    """True when ``model`` carries LoRA adapters (a peft model)."""
    return isinstance(model, PeftModel)


def _peft(model: torch.nn.Module, config: LoraConfig) -> PeftModel:
    try:
        with warnings.catch_warnings():  # peft asks transformers >= 5 a deprecated question; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise LoraError(first_line(e)) from None


def save_adapters(model: PeftModel, directory: Path) -> None:
    """Write ``model``'s adapters to ``directory``: adapter_config.json and adapter_model.safetensors
    (the ``lora_A`` / ``lora_B`` tensors only, in fp32 as trained)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(str(directory))
    tensors = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS))


def load_adapters(base: torch.nn.Module, directory: Path, trainable: bool = False) -> PeftModel:
    """``base`` (modified in place) with the adapters saved in ``directory`` by :func:`save_adapters`.
    ``trainable``: the adapters receive gradients (to continue training); otherwise nothing does.
    The global RNG is left as it was. Raises LoraError for an unreadable adapter config, a target
    that names no module of ``base``, or adapter tensors that do not match the adapters it builds."""
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    try:
        kind = json.loads(path.read_text()).get("peft_type")
        config = LoraConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise LoraError(f"{path}: unreadable ({e})") from None
    if kind != "LORA":
        raise LoraError(f"{path}: peft_type is {kind!r}, expected 'LORA'")
    with torch.random.fork_rng(devices=[]):  # A's initial values are overwritten; keep the caller's RNG
        model = _peft(base, config)
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    expected = set(get_peft_model_state_dict(model))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise LoraError(f"{directory / ADAPTER_WEIGHTS}: adapter tensors do not fit the base model "
                        f"(missing {missing[:3]}, unexpected {extra[:3]})")
    set_peft_model_state_dict(model, tensors)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable and "lora_" in name)
    return model


def merge(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model with the adapters added into its weights (``W + (alpha/r) B A``;
    peft's ``merge_and_unload``): the same embeddings, without the adapters' extra matmuls."""
    return model.merge_and_unload() if isinstance(model, PeftModel) else model

