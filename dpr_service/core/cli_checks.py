"""Checks of the paths a command line names, made before torch or transformers is imported, so that a
mistake is answered at once (issue 31.9): one message naming the flag and the path, and what the
path should have been. Standard library only: the ``dpr`` commands call these right after argparse.

    error = model_dir_error("--checkpoint", "runs/tour")   # None when it looks loadable
    # "--checkpoint runs/tour: a training run, not a checkpoint: give runs/tour/best or runs/tour/last"
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_CONFIG = "dpr_config.json"  # a dpr-service checkpoint (dpr_service.core.checkpoint.CONFIG_FILE)
MODEL_CONFIG = "config.json"  # a plain transformers or sentence-transformers model directory
MANIFEST = "manifest.json"  # an index artifact (dpr_service.core.artifact.MANIFEST)
NEEDS = (f"a checkpoint has {CHECKPOINT_CONFIG} (dpr train's last/ or best/), a plain transformers or "
         f"sentence-transformers model directory has {MODEL_CONFIG}")


def _run_checkpoints(path: Path) -> list[str]:
    """The checkpoints (``best``, ``last``) inside a ``dpr train --output`` directory, best first."""
    return [str(path / name) for name in ("best", "last") if (path / name / CHECKPOINT_CONFIG).is_file()]


def model_dir_error(flag: str, value: str, hub_ids: bool = False) -> str | None:
    """Why ``value`` cannot be the model directory ``flag`` asks for, or None when it may be one.

    A model directory is a dpr-service checkpoint (``dpr_config.json``: dpr train's ``last/`` or
    ``best/``) or a plain transformers / sentence-transformers directory (``config.json``). Names a
    training run's ``best``/``last``, and says so for an index. With ``hub_ids`` a missing path
    that looks like a Hub id (``org/name`` or ``name``, not starting with ``.``, ``/`` or ``~``)
    is let through for transformers to resolve."""
    path = Path(value).expanduser()
    if not path.exists():
        if hub_ids and not value.startswith((".", "/", "~")) and value.count("/") <= 1:
            return None
        return f"{flag} {value}: no such {'checkpoint' if flag == '--checkpoint' else 'model'} directory ({NEEDS})"
    if not path.is_dir():
        return f"{flag} {value}: a file, not a model directory ({NEEDS})"
    if (path / CHECKPOINT_CONFIG).is_file() or (path / MODEL_CONFIG).is_file():
        return None
    inside = _run_checkpoints(path)
    if inside:
        return f"{flag} {value}: a training run, not a checkpoint: give {' or '.join(inside)}"
    if (path / MANIFEST).is_file():
        return f"{flag} {value}: an index, not a model directory (its manifest names the checkpoint it was built with)"
    return f"{flag} {value}: not a model directory ({NEEDS})"


def input_error(flag: str, value: str) -> str | None:
    """Why ``value`` cannot be read as the data file or directory ``flag`` names, or None."""
    path = Path(value).expanduser()
    if not path.exists():
        return f"{flag} {value}: no such file or directory"
    return None


def output_error(flag: str, value: str) -> str | None:
    """Why ``value`` cannot be the directory ``flag`` writes, or None: a file in its place or above it."""
    path = Path(value).expanduser()
    for above in [path, *path.parents]:
        if above.exists():
            return None if above.is_dir() else f"{flag} {value}: {above} is a file, not a directory"
    return None


def first_error(*errors: str | None) -> str | None:
    """The first message that is not None."""
    return next((e for e in errors if e), None)
