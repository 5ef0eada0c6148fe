"""The shared core: torch and transformers only, never the web stack.

The trainer, the index builder and the server all import from here, so a query is tokenised,
encoded and scored by one piece of code everywhere.
"""

from .checkpoint import CheckpointError, Loaded, load_base_model, load_checkpoint, save_checkpoint
from .config import EncoderConfig
from .device import Runtime, pick_runtime
from .encoder import BiEncoder
from .formats import DataError, EvalData, Passage, TrainData, TrainExample, read_eval_data, read_train_data
from .loss import candidate_log_probs, in_batch_nll, scores
from .tokenize import TextTokenizer

__all__ = [
    "BiEncoder",
    "CheckpointError",
    "DataError",
    "EncoderConfig",
    "EvalData",
    "Loaded",
    "Passage",
    "Runtime",
    "TextTokenizer",
    "TrainData",
    "TrainExample",
    "candidate_log_probs",
    "in_batch_nll",
    "load_base_model",
    "load_checkpoint",
    "pick_runtime",
    "read_eval_data",
    "read_train_data",
    "save_checkpoint",
    "scores",
]
