"""``python -m trainer.validate CONFIG.yaml``: check a training config file with the trainer's own
rules (:func:`trainer.config.build_config`: :func:`~trainer.config.load_yaml`'s names and types, then
:meth:`~trainer.config.TrainConfig.validate`), without reading data or models.

Exit 0 (and ``ok``) when it passes; exit 2 with the one-line :class:`~trainer.config.ConfigError`
on stderr when it does not. The training service (``dpr_service/api/jobs``) runs it as a child
process, since nothing imports ``trainer``.
"""

from __future__ import annotations

import sys

from .config import ConfigError, build_config


def main(argv: list[str] | None = None) -> int:
    """Validate the YAML file named by ``argv[0]``; returns the exit code (0 valid, 2 invalid or misused)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m trainer.validate CONFIG.yaml", file=sys.stderr)
        return 2
    try:
        build_config({}, argv[0])
    except ConfigError as e:
        print(str(e).replace("\n", " "), file=sys.stderr)
        return 2
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
