"""The shared core: torch and transformers only, never the web stack.

The trainer, the index builder and the server all import from here, so a query is tokenised,
encoded and scored by one piece of code everywhere. The names below are imported on first use
(PEP 562), so that importing one light module of the core (a command line's parsing and path
checks) does not load torch and transformers.
"""

import importlib

_HOMES = {
    "CheckpointError": "checkpoint", "Loaded": "checkpoint", "load_base_model": "checkpoint",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "EncoderConfig": "config",
    "Runtime": "device", "pick_runtime": "device",
    "BiEncoder": "encoder",
    "DataError": "formats", "EvalData": "formats", "Passage": "formats", "TrainData": "formats",
    "TrainExample": "formats", "read_eval_data": "formats", "read_train_data": "formats",
    "candidate_log_probs": "loss", "in_batch_nll": "loss", "scores": "loss",
    "TextTokenizer": "tokenize",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    """``from dpr_service.core import X``: imports X's module on first use (AttributeError for an unknown name)."""
    if name not in _HOMES:  # a submodule, as `import dpr_service.core; dpr_service.core.formats` found it before
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
