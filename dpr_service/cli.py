"""The ``dpr`` command: a table of subcommands, each one a module imported only when it runs.

This dispatcher is the one place that names the other stages' packages; it imports them by name,
lazily, so that ``dpr_service`` itself never depends on ``trainer``.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("trainer.cli:main", "fine-tune a bi-encoder with the DPR loss"),
    "index": ("index.cli:index_main", "build (or add to) a FAISS index artifact from a checkpoint and a corpus"),
    "eval": ("index.cli:eval_main", "retrieval metrics of a checkpoint and its index on judged queries"),
    "bm25": ("index.cli:bm25_main", "the BM25 baseline on the same queries"),
    "mine": ("index.cli:mine_main", "training data with hard negatives mined by BM25 or by a checkpoint"),
    "serve": ("dpr_service.api.serve:main", "serve /search, /score and /encode over REST (uvicorn)"),
    "export": ("dpr_service.core.export_cli:main", "a checkpoint for sentence-transformers, transformers' DPR or ONNX Runtime"),
}


def main(argv: list[str] | None = None) -> int:
    """``dpr COMMAND ...``: dispatch to a stage's command-line entry point; returns its exit code (2 for an unknown command)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        lines = ["usage: dpr <command> [options]", "", "commands:"]
        lines += [f"  {name:<8} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        lines += ["", "Run 'dpr <command> --help' for a command's options."]
        print("\n".join(lines), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from dpr_service import __version__

        print(f"dpr-service {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"dpr: error: unknown command {name!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module, function = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), function)(argv[1:], prog=f"dpr {name}")


if __name__ == "__main__":
    sys.exit(main())
