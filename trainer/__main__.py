"""``python -m trainer ...`` is ``dpr train ...`` (and the entry point for ``torchrun -m trainer``)."""

import sys

from .cli import main

sys.exit(main(prog="python -m trainer"))
