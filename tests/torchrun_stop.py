"""`python -m trainer` under torchrun, instrumented for test_scale.py's SIGTERM test. Not a test module.

Rank 1 signals itself (SIGTERM) once two steps are logged; rank 0's checkpoint write is slowed by
2 s. Each rank records in $MARKS when it leaves the training loop (raises Interrupted, after which
it is free to exit) and rank 0 when its last/ is written, so the test can check that no rank left
before the checkpoint was on disk (torchrun kills the survivors of a rank that exits).

    MARKS=dir torchrun --standalone --nproc-per-node 2 tests/torchrun_stop.py <dpr train flags>
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import trainer.train as train_mod
from trainer.cli import main

MARKS = Path(os.environ["MARKS"])
RANK = int(os.environ["RANK"])
init = train_mod.Interrupted.__init__


def leaving(self, *args, **kwargs):
    (MARKS / f"exit-rank{RANK}").write_text(repr(time.time()))
    init(self, *args, **kwargs)


train_mod.Interrupted.__init__ = leaving

if RANK == 0:
    save = train_mod.save_training_state

    def slow_save(*args, **kwargs):
        time.sleep(2.0)
        save(*args, **kwargs)
        (MARKS / "saved").write_text(repr(time.time()))

    train_mod.save_training_state = slow_save
else:
    def signal_after_two_steps(metrics: Path) -> None:
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    output = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--output="))
    threading.Thread(target=signal_after_two_steps, args=(Path(output) / "metrics.jsonl",), daemon=True).start()

sys.exit(main(sys.argv[1:]))
