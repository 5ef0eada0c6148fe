"""A fork server for the crash tests in ``tests/test_reliability.py`` (not a test module).

Starting Python with torch, transformers and FAISS takes about 10 s on the 2-core CI machine, so
killing a fresh ``dpr`` process 50 times would take minutes of imports alone. This process imports
everything once, runs no model code itself, and forks a fresh child for each index build, training
run or server: each child is a process of its own that the test SIGKILLs at a random moment.

Protocol: one JSON object a line on stdin, one JSON answer a line on stdout.

    {"op": "spawn", "kind": "build" | "train" | "serve", "args": {...}, "log": "<file>"}  -> {"pid": N}
    {"op": "wait", "pid": N, "timeout": s}  -> {"exit": code} | {"signal": n} | {"running": true}

The children write their output to ``log`` (never to this process's stdout). On end of input the
server SIGKILLs the children still running and exits.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import uvicorn  # noqa: E402

import index.build as build_mod  # noqa: E402
from dpr_service.api.app import create_app  # noqa: E402
from dpr_service.api.settings import Settings  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.train import train  # noqa: E402


def run_child(kind: str, args: dict) -> None:
    if kind == "build":
        build_mod.PART_SIZE = args.pop("part_size", build_mod.PART_SIZE)  # small parts: several resumable files
        build_mod.build(progress=False, device="cpu", factory="Flat", **args)
    elif kind == "train":
        train(TrainConfig.from_settings(**args))
    elif kind == "serve":
        port = args.pop("port")
        uvicorn.run(create_app(Settings(**args)), host="127.0.0.1", port=port, log_level="warning")
    else:
        raise ValueError(f"unknown kind {kind!r}")


def spawn(kind: str, args: dict, log: str) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:  # the child: never returns into the protocol loop
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        run_child(kind, args)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pid: int, timeout: float | None) -> dict:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return {"signal": os.WTERMSIG(status)}
            return {"exit": os.WEXITSTATUS(status)}
        if deadline is not None and time.monotonic() > deadline:
            return {"running": True}
        time.sleep(0.002)


def main() -> None:
    children: set[int] = set()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "spawn":
                pid = spawn(cmd["kind"], cmd["args"], cmd["log"])
                children.add(pid)
                answer = {"pid": pid}
            elif cmd["op"] == "wait":
                answer = wait(cmd["pid"], cmd.get("timeout"))
                if "running" not in answer:
                    children.discard(cmd["pid"])
            else:
                answer = {"error": f"unknown op {cmd['op']!r}"}
            print(json.dumps(answer), flush=True)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


if __name__ == "__main__":
    main()
