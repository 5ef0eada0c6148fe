"""``python -m index build|add ...`` (the same as ``dpr index``; runs under torchrun too)."""

import sys

from .cli import index_main

sys.exit(index_main(sys.argv[1:], prog="python -m index"))
