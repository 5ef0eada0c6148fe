"""``dpr export``: write a checkpoint as a sentence-transformers, transformers DPR or ONNX directory
(:mod:`dpr_service.core.export`; docs/export.md). It lives in the core because the export does
(the ``dpr`` dispatcher may name only core and stage modules)."""

from __future__ import annotations

import argparse
import logging
import sys

from .cli_checks import first_error, model_dir_error, output_error

FORMATS = ("sentence-transformers", "hf-dpr", "onnx")  # dpr_service.core.export.FORMATS, without importing torch to parse


def main(argv: list[str] | None = None, prog: str = "dpr export") -> int:
    """Parse the flags and export; returns 0, or 2 with one line on stderr naming the checkpoint and
    the problem (a checkpoint that does not load, a format that does not fit it, a missing extra)."""
    parser = argparse.ArgumentParser(prog=prog, description="Export a checkpoint for sentence-transformers, "
                                     "transformers' DPR classes or ONNX Runtime, with a model card (README.md).")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (dpr train's last/ or best/) or a model directory")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    parser.add_argument("--output", required=True, help="directory to write (replaced atomically when it exists)")
    parser.add_argument("--quantize", choices=("int8",), help="--format onnx: dynamic int8 quantisation (onnxruntime)")
    args = parser.parse_args(argv)
    problem = first_error(model_dir_error("--checkpoint", args.checkpoint), output_error("--output", args.output))
    if problem:  # before torch loads: at once (issue 31.9)
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from .checkpoint import CheckpointError
    from .errors import first_line
    from .export import ExportError, export

    try:
        out = export(args.checkpoint, args.fmt, args.output, args.quantize)
    except (ExportError, CheckpointError, ImportError, OSError) as e:
        print(f"{prog}: error: {first_line(e)}", file=sys.stderr)
        return 2
    print(f"exported: {out}")
    return 0
