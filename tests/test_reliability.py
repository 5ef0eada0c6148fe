"""Reliability and security: crashes, hostile input, overload (the service keeps working and loses
nothing).

* Crashes: an index build, a server in the middle of ``/admin/reload`` and a training run are
  SIGKILLed at random moments (children of ``tests/crashloop.py``, a fork server, so that each kill
  does not pay 10 s of imports); after each kill the index on disk is the old or the new one,
  complete and checksum-valid, with the same top-10 for fixed queries, the last complete checkpoint
  loads, and a resumed training run ends with bit-identical weights. Corrupted or truncated files
  are refused with an error naming the file.
* Hostile input: schemathesis over the app's own OpenAPI schema with every check, bodies that are
  oversized, chunked, deeply nested, not UTF-8 or of the wrong types, the API key on every path,
  and an audit that nothing unpickles and FAISS reads only verified files.
* Overload: a real server at 3x its measured capacity answers only 200 or 503 with Retry-After,
  keeps its memory, and is back to normal latency within seconds; then a constant-rate run below
  capacity fails no request.

The default (CI) counts keep this file to a few minutes on 2 cores. ``DPR_SOAK=1`` runs the long
version (hundreds of kills, many more fuzzed inputs, a 60 s constant-rate run); each count can also
be set alone (``DPR_BUILD_KILLS``, ``DPR_RELOAD_KILLS``, ``DPR_TRAIN_KILLS``, ``DPR_FUZZ_EXAMPLES``,
``DPR_STEADY_SECONDS``, ``DPR_FLIPS``), and ``DPR_SEED`` changes the random kill points.
``DPR_RELIABILITY_OUT=<file>`` appends every figure as a JSON line (RELIABILITY.md reports them).
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from conftest import WORDS, AsgiForward, write_beir, write_plain
from fastapi.testclient import TestClient

from dpr_service.api.app import OPEN_ROUTES, app_routes, create_app
from dpr_service.api.settings import Settings
from dpr_service.core.checkpoint import CheckpointError, load_base_model, load_checkpoint, recover_directory, save_checkpoint
from dpr_service.core.config import EncoderConfig
from dpr_service.core.device import pick_runtime
from dpr_service.core.inference import encode_texts
from dpr_service.core.artifact import ArtifactError
from index.build import build
from dpr_service.core.search import Searcher

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import overload  # noqa: E402  (benchmarks/overload.py: the load generator)

CPU = pick_runtime("cpu", "fp32")
KEY = "reliability-key-0123456789"
SOAK = os.environ.get("DPR_SOAK", "") not in ("", "0")


def _count(name: str, ci: int, soak: int) -> int:
    return int(os.environ.get(name, soak if SOAK else ci))


BUILD_KILLS = _count("DPR_BUILD_KILLS", 50, 500)
RELOAD_KILLS = _count("DPR_RELOAD_KILLS", 10, 100)
TRAIN_KILLS = _count("DPR_TRAIN_KILLS", 12, 100)
FUZZ_EXAMPLES = _count("DPR_FUZZ_EXAMPLES", 25, 400)
STEADY_SECONDS = _count("DPR_STEADY_SECONDS", 10, 60)
FLIPS = _count("DPR_FLIPS", 3, 25)  # bytes flipped (one at a time) in each file of a checkpoint or index
SEED = int(os.environ.get("DPR_SEED", "20261123"))
QUERIES = ["what is the apple near the river", "comet walnut", "which falcon is near the meadow",
           "the zebra and the guitar", "lantern in winter", "copper dragon castle"]


def record(name: str, **figures) -> None:
    """Print a test's figures, and append them to $DPR_RELIABILITY_OUT when it is set."""
    print(f"\n[reliability] {name}: {json.dumps(figures)}")
    out = os.environ.get("DPR_RELIABILITY_OUT")
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps({"test": name, "soak": SOAK, **figures}) + "\n")


# ----------------------------------------------------------------------------- fixtures


def top10(searcher: Searcher, q_emb: np.ndarray) -> list[list[tuple[str, float]]]:
    return [[(h.id, h.score) for h in hits] for hits in searcher.search(q_emb, 10)]


def same_ranking(a, b, tol=1e-4) -> bool:
    return all([i for i, _ in x] == [i for i, _ in y] and np.allclose([s for _, s in x], [s for _, s in y], atol=tol)
               for x, y in zip(a, b)) and len(a) == len(b)


@pytest.fixture(scope="module")
def art(tmp_path_factory, tiny_model):
    """A checkpoint, corpus A (40 passages, the "old" index) and B (A plus 12 passages that change the
    fixed queries' top-10: the "new" one), the index of A, and the fixed queries' embeddings."""
    root = tmp_path_factory.mktemp("reliability")
    cfg = EncoderConfig(pooling="mean", similarity="dot", query_max_length=16, passage_max_length=32)
    encoder, tokenizer = load_base_model(str(tiny_model), cfg)
    save_checkpoint(root / "ckpt", encoder, tokenizer)
    beir = write_beir(root / "beir", n=40)
    corpus_a = root / "a.jsonl"
    shutil.copy(beir / "corpus.jsonl", corpus_a)
    rng = random.Random(3)
    extra = [{"_id": f"x{i}", "title": w, "text": f"the {w} and the {rng.choice(WORDS)} near the river"}
             for i, w in enumerate(rng.sample(WORDS, 12))]
    corpus_b = root / "b.jsonl"
    corpus_b.write_text(corpus_a.read_text() + "".join(json.dumps(x) + "\n" for x in extra))
    index_a = build(root / "ckpt", corpus_a, root / "index-a", factory="Flat", progress=False)
    loaded = load_checkpoint(root / "ckpt")
    q_emb = encode_texts(loaded.encoder, loaded.tokenizer, QUERIES, "query", CPU).numpy()
    ids_a = {json.loads(line)["_id"] for line in corpus_a.read_text().splitlines()}
    return SimpleNamespace(root=root, ckpt=root / "ckpt", corpus={"old": corpus_a, "new": corpus_b}, index_a=index_a,
                           fingerprint=loaded.fingerprint, q_emb=q_emb,
                           ids={"old": ids_a, "new": ids_a | {x["_id"] for x in extra}})


class ForkServer:
    """Client of tests/crashloop.py: spawn a build, a training run or a server as a fresh child."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "crashloop.py")], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(logdir / "forkserver.log", "w"))
        assert "ready" in self._read(), "the fork server did not start; see " + str(logdir / "forkserver.log")
        self.n = 0

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died; see " + str(self.logdir / "forkserver.log"))
        return json.loads(line)

    def _call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def spawn(self, kind: str, **args) -> int:
        self.n += 1
        log = self.logdir / f"{self.n:04d}-{kind}.log"
        return self._call(op="spawn", kind=kind, args={k: str(v) if isinstance(v, Path) else v for k, v in args.items()},
                          log=str(log))["pid"]

    def wait(self, pid: int, timeout: float | None = 120) -> dict:
        return self._call(op="wait", pid=pid, timeout=timeout)

    def log(self) -> str:
        """The end of the latest child's output (for assertion messages)."""
        logs = sorted(self.logdir.glob("0*.log"))
        return logs[-1].read_text()[-3000:] if logs else ""

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def forkserver(tmp_path_factory):
    if not sys.platform.startswith("linux"):
        pytest.skip("the crash and load tests fork children and read /proc (Linux)")
    fs = ForkServer(tmp_path_factory.mktemp("forkserver-logs"))
    yield fs
    fs.close()


def running(pid: int) -> bool:
    """Not yet exited (a zombie awaiting its wait counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def sigkill(fs: ForkServer, pid: int) -> dict:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return fs.wait(pid, timeout=60)


def kill_after(fs: ForkServer, pid: int, delay: float) -> dict:
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and running(pid):
        time.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
    return sigkill(fs, pid)


def kill_when(fs: ForkServer, pid: int, directory: Path, prefix: str, then: float, before: set, timeout: float = 60) -> dict:
    """SIGKILL ``then`` seconds after a new entry named ``prefix...`` appears in ``directory`` (the
    temporary directory of an atomic write)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and running(pid):
        if any(n.startswith(prefix) and n not in before for n in entries(directory)):  # it may not exist yet
            break
        time.sleep(0.0005)
    return kill_after(fs, pid, then)


def entries(directory: Path) -> set:
    return set(os.listdir(directory)) if directory.is_dir() else set()


def served_state(path: Path, art, refs: dict) -> str:
    """Load the index at ``path`` as a restarted server would; it must be exactly the old or the new
    one: every checksum valid, every passage once, the same top-10 for the fixed queries."""
    searcher = Searcher(path, art.fingerprint)  # checks the manifest, every checksum, the counts
    ids = [pid for pid, _, _ in searcher.store.by_rows(range(searcher.count)).values()]
    assert len(ids) == len(set(ids)) == searcher.count == searcher.index.ntotal
    top = top10(searcher, art.q_emb)
    for name in ("old", "new"):
        if set(ids) == art.ids[name] and same_ranking(top, refs[name]):
            return name
    raise AssertionError(f"{path} is neither the old nor the new index: {len(ids)} passages, top-10 {top[0][:3]}...")


# ----------------------------------------------------------------------------- crashes: index build


@pytest.fixture(scope="module")
def rebuild(forkserver, art, tmp_path_factory):
    """An uninterrupted rebuild A -> B by a child (8-passage resumable parts): the reference new
    index, how long a rebuild takes and how long its atomic swap lasts."""
    ref = tmp_path_factory.mktemp("rebuild-ref") / "index"
    shutil.copytree(art.index_a, ref)
    before = entries(ref.parent)
    t0 = time.monotonic()
    pid = spawn_build(forkserver, art, "new", ref)
    while running(pid) and not any(n.startswith(".index.tmp-") for n in entries(ref.parent) - before):
        time.sleep(0.0005)
    t_swap_start = time.monotonic() - t0
    assert forkserver.wait(pid) == {"exit": 0}, forkserver.log()
    t_total = time.monotonic() - t0
    refs = {"old": top10(Searcher(art.index_a), art.q_emb), "new": top10(Searcher(ref), art.q_emb)}
    assert not same_ranking(refs["old"], refs["new"]), "the new passages should change the top-10"
    return SimpleNamespace(refs=refs, t_total=t_total, t_swap=max(0.005, t_total - t_swap_start))


def spawn_build(fs: ForkServer, art, version: str, output: Path) -> int:
    return fs.spawn("build", checkpoint=art.ckpt, corpus_path=art.corpus[version], output=output, part_size=8)


def test_index_build_sigkilled_at_random_points(forkserver, art, rebuild, tmp_path):
    """SIGKILL a rebuild (corpus A -> B into the same path) at random moments, half of them inside
    its atomic swap; after every kill the index there is the old or the new one, and a rerun ends
    with the new one and nothing left behind (no temporary, partial or .old directory)."""
    rng = random.Random(SEED)
    kills, episodes, finished_early, states, modes, landed = 0, 0, 0, Counter(), Counter(), Counter()
    t0 = time.monotonic()
    while kills < BUILD_KILLS:
        episodes += 1
        path = tmp_path / f"e{episodes}" / "index"
        shutil.copytree(art.index_a, path)
        for _ in range(rng.randint(1, 4)):
            if kills >= BUILD_KILLS:
                break
            before = entries(path.parent)
            pid = spawn_build(forkserver, art, "new", path)
            if rng.random() < 0.5:
                mode, result = "anywhere", kill_after(forkserver, pid, rng.uniform(0, rebuild.t_total))
            else:
                mode = "in the swap"
                result = kill_when(forkserver, pid, path.parent, ".index.tmp-", rng.uniform(0, 0.6 * rebuild.t_swap), before)
            if result.get("signal") == signal.SIGKILL:
                kills += 1
                modes[mode] += 1
                left = entries(path.parent)
                landed["encoded parts left"] += ".index.partial" in left
                landed["a half-written new index left"] += any(n.startswith(".index.tmp-") for n in left - before)
                landed["between the two renames"] += ".index.old" in left and "index" not in left
            else:
                assert result == {"exit": 0}, forkserver.log()
                finished_early += 1
            states[served_state(path, art, rebuild.refs)] += 1  # a restart serves the old or the new index
        pid = spawn_build(forkserver, art, "new", path)  # the operator reruns the build: it completes
        assert forkserver.wait(pid) == {"exit": 0}, forkserver.log()
        assert served_state(path, art, rebuild.refs) == "new"
        assert sorted(entries(path.parent)) == ["index"], f"left behind: {sorted(entries(path.parent))}"
        shutil.rmtree(path.parent)
    record("index build SIGKILL", kills=kills, episodes=episodes, kill_modes=dict(modes), kills_that_left=dict(landed),
           runs_finished_before_the_kill=finished_early, index_after_kill=dict(states),
           build_s=round(rebuild.t_total, 3), swap_s=round(rebuild.t_swap, 3), wall_s=round(time.monotonic() - t0, 1))
    assert kills >= BUILD_KILLS and states["old"] and states["new"]


# States a SIGKILL of `dpr index build` / `dpr index add` can leave that the random kills above hit
# rarely (microsecond windows), set up directly.


def test_a_merge_lock_left_empty_by_a_kill_is_taken_over(tmp_path, art):
    partial = tmp_path / ".index.partial"
    partial.mkdir()
    (partial / "merge.lock").write_text("")
    assert build(art.ckpt, art.corpus["old"], tmp_path / "index", factory="Flat", progress=False) == tmp_path / "index"


def test_parts_left_by_an_interrupted_cleanup_are_not_reused_for_another_corpus(tmp_path, art, monkeypatch):
    import index.build as build_mod

    monkeypatch.setattr(build_mod, "PART_SIZE", 8)
    reversed_a = tmp_path / "reversed.jsonl"
    reversed_a.write_text("".join(reversed(art.corpus["old"].read_text().splitlines(keepends=True))))
    out = tmp_path / "index"
    monkeypatch.setattr(build_mod.shutil, "rmtree", lambda *a, **k: None)  # the final cleanup is "killed" ...
    build(art.ckpt, reversed_a, out, factory="Flat", progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(build_mod, "PART_SIZE", 8)
    partial = tmp_path / ".index.partial"
    (done,) = tmp_path.glob(".index.partial.done-*")  # the finished build renamed its work directory first
    # the state an older layout or a kill inside a removal can leave: parts without their build.json
    shutil.copytree(done, partial)
    (partial / "build.json").unlink()
    (partial / "merge.lock").unlink()
    build(art.ckpt, art.corpus["old"], out, factory="Flat", progress=False)
    assert not list(tmp_path.glob(".index.partial*"))  # both leftovers cleared
    clean = build(art.ckpt, art.corpus["old"], tmp_path / "clean", factory="Flat", progress=False)
    np.testing.assert_allclose(Searcher(out).index.reconstruct_n(0, 40), Searcher(clean).index.reconstruct_n(0, 40), atol=1e-6)


def test_add_after_an_interrupted_swap(tmp_path, art):
    """`dpr index add` on an index whose last replacement was killed between its two renames: the
    replacement puts the previous artifact back first (atomic_directory recovers before it swaps)."""
    from index.build import add

    shutil.copytree(art.index_a, tmp_path / ".index.old")
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"_id": "n1", "title": "", "text": "the comet near the castle"}) + "\n")
    add(tmp_path / "index", new, checkpoint=art.ckpt, progress=False)
    assert Searcher(tmp_path / "index").count == len(art.ids["old"]) + 1


# ----------------------------------------------------------------------------- crashes: server during reload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, pid: int, timeout: float = 60) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert running(pid), "the server exited"
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    raise AssertionError("the server never became ready")


def http_top10(base: str) -> list[list[tuple[str, float]]]:
    r = httpx.post(f"{base}/search", json={"queries": QUERIES, "top_k": 10, "with_text": False},
                   headers={"X-API-Key": KEY}, timeout=30)
    assert r.status_code == 200, r.text
    return [[(h["id"], h["score"]) for h in hits] for hits in r.json()["results"]]


def test_server_sigkilled_during_reload_while_the_index_is_rebuilt(forkserver, art, rebuild, tmp_path):
    """A deploy rebuilds the index in place while the server reloads it again and again and answers
    searches; the server (and sometimes the build too) is SIGKILLed at a random moment. Before the
    kill every answer is 200, or 409 for a reload that found the new index incomplete; after a
    restart the server serves the index on disk, the old or the new one, with the same top-10."""
    rng = random.Random(SEED + 1)
    live = tmp_path / "live" / "index"
    shutil.copytree(art.index_a, live)
    settings = dict(index=live, checkpoint=art.ckpt, device="cpu", batch_max_wait_ms=1, api_key=KEY)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = forkserver.spawn("serve", port=port, **settings)
    wait_ready(base, server)
    target, kills, builder_kills, statuses, restarts, served_states = "new", 0, 0, Counter(), [], Counter()
    t0_all = time.monotonic()
    try:
        for _ in range(RELOAD_KILLS):
            builder = spawn_build(forkserver, art, target, live)
            stop, seen = threading.Event(), []

            def loop(path, body, stop=stop, seen=seen):
                with httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=30) as c:
                    while not stop.is_set():
                        try:
                            seen.append(c.post(path, json=body).status_code)
                        except httpx.TransportError:
                            seen.append("down")
                            return

            threads = [threading.Thread(target=loop, args=("/admin/reload", None)),
                       threading.Thread(target=loop, args=("/search", {"query": QUERIES[0], "with_text": False}))]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0, rebuild.t_total))
            assert sigkill(forkserver, server).get("signal") == signal.SIGKILL
            kills += 1
            stop.set()
            for t in threads:
                t.join(timeout=60)
            statuses.update(str(s) for s in seen)
            assert set(seen) <= {200, 409, "down"}, Counter(seen)
            if rng.random() < 0.3:
                builder_kills += sigkill(forkserver, builder).get("signal") == signal.SIGKILL
            else:
                assert forkserver.wait(builder) == {"exit": 0}, forkserver.log()
            # restart: the server serves what is on disk, and that is the old or the new index
            server = forkserver.spawn("serve", port=port, **settings)
            restarts.append(wait_ready(base, server))
            disk = served_state(live, art, rebuild.refs)
            served_states[disk] += 1
            assert same_ranking(http_top10(base), rebuild.refs[disk])
            assert httpx.get(f"{base}/info", headers={"X-API-Key": KEY}).json()["index"]["count"] == len(art.ids[disk])
            if disk == target and not (live.parent / ".index.partial").exists():
                target = "old" if target == "new" else "new"
    finally:
        sigkill(forkserver, server)
    record("server SIGKILL during /admin/reload", kills=kills, builds_killed_too=builder_kills,
           answers_before_the_kill=dict(statuses), served_after_restart=dict(served_states),
           restart_to_ready_s_max=round(max(restarts), 2), wall_s=round(time.monotonic() - t0_all, 1))
    assert kills == RELOAD_KILLS and statuses["200"]


# ----------------------------------------------------------------------------- crashes: training


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{sub}.{k}": v for sub in ("query_encoder", "passage_encoder")
            for k, v in load_file(path / sub / "model.safetensors").items()}


def test_training_sigkilled_while_checkpointing_resumes_to_identical_weights(forkserver, tiny_model, tmp_path):
    """SIGKILL a training run (a checkpoint every step) at random moments, half of them while
    ``last/`` is being written; after every kill the last complete checkpoint loads through the one
    loader and never goes back in steps, and ``--resume`` ends with exactly the weights (and the
    logged losses) of an uninterrupted run."""
    rng = random.Random(SEED + 2)
    data = write_plain(tmp_path / "train.jsonl", n=24)  # 6 steps an epoch at batch 4
    steps = 2 * TRAIN_KILLS + 8
    base = dict(model=str(tiny_model), train=str(data), batch_size=4, hard_negatives=1, pooling="mean",
                query_max_length=16, passage_max_length=32, lr=1e-3, max_steps=steps, save_every=1, log_every=1,
                progress=False, seed=11, device="cpu")
    straight = tmp_path / "straight"
    t0 = time.monotonic()
    pid = forkserver.spawn("train", **base, output=str(straight))
    while running(pid) and not any(n.startswith(".last.tmp-") for n in entries(straight)):
        time.sleep(0.001)
    t_first_save = time.monotonic() - t0
    assert forkserver.wait(pid) == {"exit": 0}, forkserver.log()
    t_step = (time.monotonic() - t0 - t_first_save) / steps

    cut = tmp_path / "cut"
    kills, runs, modes, last_step, completed = 0, 0, Counter(), 0, False
    while kills < TRAIN_KILLS:
        resume = (cut / "last").exists() or (cut / ".last.old").exists()
        before = entries(cut)
        pid = forkserver.spawn("train", **base, output=str(cut), resume=resume)
        runs += 1
        if rng.random() < 0.5:
            mode = "writing last/"
            # the output directory appears only once data and model have loaded (a run that never
            # starts leaves nothing behind), so watch where it will be
            result = kill_when(forkserver, pid, cut, ".last.tmp-", rng.uniform(0, t_step), before)
        else:
            mode, result = "anywhere", kill_after(forkserver, pid, rng.uniform(0.5 * t_first_save, t_first_save + 2 * t_step))
        if result != {"signal": signal.SIGKILL}:
            assert result == {"exit": 0}, forkserver.log()
            completed = True
            break
        kills += 1
        modes[mode] += 1
        last = recover_directory(cut / "last")  # what the next run does first
        if last.exists():
            load_checkpoint(last)  # the one loader: config, checksums of every file, fingerprint
            step = json.loads((last / "training_state" / "state.json").read_text())["progress"]["step"]
            assert step >= last_step, "a checkpoint went back in time"
            last_step = step
    if not completed:
        pid = forkserver.spawn("train", **base, output=str(cut), resume=(cut / "last").exists())
        assert forkserver.wait(pid) == {"exit": 0}, forkserver.log()
    a, b = weights(straight / "last"), weights(cut / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    # the same loss at every step (by step: a run killed before its first checkpoint leaves log lines
    # that the next fresh run repeats; see test_a_fresh_restart_does_not_repeat_log_lines)
    losses = lambda out: {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}  # noqa: E731
    assert losses(straight) == losses(cut)
    assert sorted(n for n in entries(cut) if n.startswith(".")) == [], f"left behind: {sorted(entries(cut))}"
    record("training SIGKILL", kills=kills, kill_modes=dict(modes), runs=runs + 1, steps=steps,
           finished_before_enough_kills=completed, step_s=round(t_step, 3))
    assert kills >= TRAIN_KILLS // 2


def test_a_fresh_restart_does_not_repeat_log_lines(tmp_path, tiny_model):
    """The state a SIGKILL between the step-1 log line and the first checkpoint leaves: a log line
    and no last/. The rerun (without --resume: there is nothing to resume) must not log step 1 twice."""
    from trainer.config import TrainConfig
    from trainer.train import train

    data = write_plain(tmp_path / "train.jsonl", n=8)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "epoch": 0, "loss": 9.0}) + "\n")
    train(TrainConfig.from_settings(model=str(tiny_model), train=str(data), output=str(out), batch_size=4, pooling="mean",
                      query_max_length=16, passage_max_length=32, max_steps=2, log_every=1, progress=False, device="cpu"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# ----------------------------------------------------------------------------- crashes: damaged files


def corruptions(data: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    out = [("emptied", b""), ("truncated to half", data[: len(data) // 2]), ("one byte cut", data[:-1]),
           ("junk appended", data + b"\x00junk")]
    for _ in range(FLIPS):
        if data:
            i = rng.randrange(len(data))
            out.append((f"byte {i} flipped", data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]))
    return [(name, d) for name, d in out if d != data]


def trainer_optimizer(encoder):
    """The optimizer and schedule shaped as the trainer makes them (two parameter groups)."""
    decay = [p for p in encoder.parameters() if p.ndim >= 2]
    no_decay = [p for p in encoder.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}])
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, tiny_model):
    """A real ``last/`` of a 2-step training run: encoders, tokenizer, config, training_state."""
    from trainer.config import TrainConfig
    from trainer.train import train

    tmp = tmp_path_factory.mktemp("trained")
    data = write_plain(tmp / "train.jsonl", n=8)
    return train(TrainConfig.from_settings(model=str(tiny_model), train=str(data), output=str(tmp / "out"), batch_size=4, pooling="mean",
                             query_max_length=16, passage_max_length=32, max_steps=2, progress=False, device="cpu"))


def test_damaged_checkpoint_files_are_named_never_a_crash_in_torch(trained_checkpoint, tmp_path):
    """Every file of a checkpoint emptied, truncated, extended or with a flipped byte: loading
    (and resuming from) it fails with a CheckpointError naming that file, or, when the change is
    harmless, loads the very same model."""
    from trainer.state import load_training_state

    rng = random.Random(SEED + 3)
    src = trained_checkpoint
    reference = load_checkpoint(src)
    texts = ["apple river", "comet walnut"]
    expected = encode_texts(reference.encoder, reference.tokenizer, texts, "query", CPU)
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    assert "training_state/optimizer.safetensors" in files and "checksums.json" in files
    tried, refused, harmless = 0, 0, 0
    for rel in files:
        for how, data in corruptions((src / rel).read_bytes(), rng):
            tried += 1
            ckpt = tmp_path / f"c{tried}"
            shutil.copytree(src, ckpt)
            (ckpt / rel).write_bytes(data)
            try:
                loaded = load_checkpoint(ckpt)  # what --resume does first, then the training state
                state = loaded.encoder.state_dict()
                load_training_state(ckpt, *trainer_optimizer(loaded.encoder), CPU.grad_scaler())
            except CheckpointError as e:
                named = rel in str(e) or (rel == "checksums.json" and "checksums.json" in str(e))
                assert named, f"{rel} {how}: the error does not name the file: {e}"
                refused += 1
            except Exception as e:  # noqa: BLE001 - anything else is a crash inside a library
                pytest.fail(f"{rel} {how}: {type(e).__name__} instead of a CheckpointError: {e}")
            else:
                harmless += 1
                got = encode_texts(loaded.encoder, loaded.tokenizer, texts, "query", CPU)
                assert torch.equal(got, expected) and state.keys() == reference.encoder.state_dict().keys(), \
                    f"{rel} {how}: loaded a different model without a word"
            shutil.rmtree(ckpt)
    record("damaged checkpoint files", files=len(files), damaged_copies=tried, refused_naming_the_file=refused,
           harmless_and_identical=harmless)
    assert refused >= tried - harmless and refused > 0


def test_damaged_index_files_are_named_never_a_crash_in_faiss(art, tmp_path):
    rng = random.Random(SEED + 4)
    src = art.index_a
    expected = top10(Searcher(src, art.fingerprint), art.q_emb)
    tried, refused, harmless = 0, 0, 0
    for rel in sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()):  # bm25/ files too
        for how, data in corruptions((src / rel).read_bytes(), rng):
            tried += 1
            idx = tmp_path / f"i{tried}"
            shutil.copytree(src, idx)
            (idx / rel).write_bytes(data)
            try:
                searcher = Searcher(idx, art.fingerprint)
            except ArtifactError as e:
                assert rel in str(e), f"{rel} {how}: the error does not name the file: {e}"
                refused += 1
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"{rel} {how}: {type(e).__name__} instead of an ArtifactError: {e}")
            else:
                harmless += 1  # e.g. a flipped byte in the manifest's "created" date
                assert top10(searcher, art.q_emb) == expected, f"{rel} {how}: a different index without a word"
            shutil.rmtree(idx)
    record("damaged index files", damaged_copies=tried, refused_naming_the_file=refused, harmless_and_identical=harmless)
    assert refused > 0


def test_interrupted_swap_serves_the_previous_artifact(art, tmp_path):
    """Killed between the two renames of a replacement: the index directory is gone and
    ``.index.old`` holds the previous artifact; a (read-only) server serves that one."""
    live = tmp_path / "index"
    shutil.copytree(art.index_a, tmp_path / ".index.old")
    shutil.copytree(art.index_a, tmp_path / ".index.tmp-999999-dead")  # the new one, never renamed
    with TestClient(create_app(Settings(index=live, checkpoint=art.ckpt, device="cpu", batch_max_wait_ms=1))) as c:
        assert c.get("/readyz").status_code == 200
        assert c.get("/info").json()["index"]["count"] == len(art.ids["old"])
    assert not live.exists()  # read in place: the server writes nothing


# ----------------------------------------------------------------------------- artifacts: no unpickling


UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal", "jsonpickle", "pandas"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expression>"
    return None


def audit(source: str, filename: str = "<source>") -> list[str]:
    """Every way this project could unpickle (or run code from) a file: pickle-family imports,
    ``torch.load`` without ``weights_only=True``, ``torch.jit.load``, ``np.load(allow_pickle=...)``,
    ``yaml.load``, ``trust_remote_code``, and FAISS reading an index in a function that has not
    checked the manifest's checksums first."""
    problems = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            problems += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UNPICKLERS:
            problems.append(f"{where}: imports from {node.module}")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            problems.append(f"{where}: from torch import load")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name.endswith("torch.load") and _keyword(node, "weights_only") is not True:
                problems.append(f"{where}: torch.load without weights_only=True")
            if name.endswith("jit.load") or last in ("read_pickle", "unsafe_load", "full_load") or name.endswith("serialization.load"):
                problems.append(f"{where}: {name}")
            if name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") not in (None, False):
                problems.append(f"{where}: {name} with allow_pickle")
            if name == "yaml.load" and _dotted(next((kw.value for kw in node.keywords if kw.arg == "Loader"), ast.Name("?"))) \
                    not in ("yaml.SafeLoader", "yaml.CSafeLoader", "SafeLoader"):
                problems.append(f"{where}: yaml.load without a safe loader")
            if _keyword(node, "trust_remote_code") not in (None, False):
                problems.append(f"{where}: trust_remote_code")
            if last == "eval" and name == "eval" or last == "exec" and name == "exec":
                problems.append(f"{where}: {name}()")
    for fn in ast.walk(tree):  # FAISS reads an index only after a checksum check in the same function
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            checks = [n.lineno for n in ast.walk(fn) if isinstance(n, ast.Call)
                      and _dotted(n.func).rsplit(".", 1)[-1] in ("verify", "verify_files")]
            for n in ast.walk(fn):
                if isinstance(n, ast.Call) and _dotted(n.func).rsplit(".", 1)[-1] in ("read_index", "read_index_binary", "deserialize_index"):
                    if not any(line < n.lineno for line in checks):
                        problems.append(f"{filename}:{n.lineno}: {_dotted(n.func)} before any checksum check in {fn.name}()")
    return problems


BAD_SOURCES = [
    "import pickle", "from joblib import load", "import dill as d", "from torch import load",
    "torch.load(path)", "torch.load(path, weights_only=False)", "torch.load(path, weights_only=flag)",
    "torch.jit.load(path)", "np.load(path, allow_pickle=True)", "numpy.load(p, allow_pickle=x)",
    "yaml.load(text)", "yaml.load(text, Loader=yaml.Loader)", "yaml.unsafe_load(text)", "pd.read_pickle(p)",
    "AutoModel.from_pretrained(p, trust_remote_code=True)", "eval(text)",
    "def f(d):\n    return faiss.read_index(str(d / 'index.faiss'))",
    "def f(d, m):\n    i = faiss.read_index(p)\n    verify_files(d, m)\n    return i",
]


@pytest.mark.parametrize("source", BAD_SOURCES)
def test_the_audit_catches_each_way_to_unpickle(source):
    assert audit(source), source


def test_no_code_path_unpickles_or_reads_unverified_files():
    assert audit("torch.load(p, weights_only=True)\nnp.load(p)\nyaml.safe_load(t)\n"
                 "def f(d, m):\n    pinned.verify(m)\n    return faiss.read_index(p)\n") == []
    sources = sorted(p for pkg in ("dpr_service", "trainer", "index") for p in (ROOT / pkg).rglob("*.py"))
    problems = [msg for path in sources for msg in audit(path.read_text(), str(path.relative_to(ROOT)))]
    assert problems == []
    reads = [p.relative_to(ROOT).as_posix() for p in sources if any(
        isinstance(n, ast.Call) and _dotted(n.func).endswith("read_index") for n in ast.walk(ast.parse(p.read_text())))]
    assert reads == ["dpr_service/core/search.py"]  # the one place FAISS reads an index
    record("pickle audit", files=len(sources), bad_patterns_caught=len(BAD_SOURCES))


class Unpickled(AssertionError):
    pass


def test_loading_never_unpickles_at_runtime(art, trained_checkpoint, tmp_path, monkeypatch):
    """With pickle and torch.load made to fail, every loader still works: the checkpoint (with its
    training state), the index, the server's start, search, score, encode and reload, a build and
    an add. (Static checks can miss a library's own unpickling; this cannot.)"""
    import pickle

    import dpr_service.core.search as search_mod
    from index.build import add
    from trainer.state import load_training_state

    def forbidden(*args, **kwargs):
        raise Unpickled("something unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    order = []
    real_read, real_verify = search_mod.faiss.read_index, search_mod.PinnedDirectory.verify
    monkeypatch.setattr(search_mod.faiss, "read_index", lambda *a, **k: (order.append("read"), real_read(*a, **k))[1])
    monkeypatch.setattr(search_mod.PinnedDirectory, "verify", lambda *a, **k: (order.append("verify"), real_verify(*a, **k))[1])

    loaded = load_checkpoint(trained_checkpoint)
    load_training_state(trained_checkpoint, *trainer_optimizer(loaded.encoder), CPU.grad_scaler())
    Searcher(art.index_a, art.fingerprint)
    index = tmp_path / "index"
    build(art.ckpt, art.corpus["old"], index, factory="Flat", progress=False)
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"_id": "n1", "title": "", "text": "the comet near the castle"}) + "\n")
    add(index, new, checkpoint=art.ckpt, progress=False)
    with TestClient(create_app(Settings(index=index, checkpoint=art.ckpt, device="cpu", batch_max_wait_ms=1))) as c:
        assert c.post("/search", json={"query": "apple"}).status_code == 200
        assert c.post("/score", json={"items": [{"question": "q", "positive": "p", "negatives": ["n"]}]}).status_code == 200
        assert c.post("/encode", json={"texts": ["apple"]}).status_code == 200
        assert c.post("/admin/reload").status_code == 200
    assert order and order[0] == "verify" and all(a == "verify" and b == "read" for a, b in zip(order[::2], order[1::2])), order
    # a damaged index file: FAISS never sees it
    order.clear()
    (index / "index.faiss").write_bytes((index / "index.faiss").read_bytes()[:-4])
    with pytest.raises(ArtifactError, match="index.faiss: checksum does not match"):
        Searcher(index)
    assert order == ["verify"]


# ----------------------------------------------------------------------------- hostile input


LIMITS = dict(max_queries=4, max_top_k=10, max_text_chars=200, max_items=3, max_passages_per_item=3, max_body_bytes=20_000)
NESTED = {"deep arrays": b"[" * 100_000 + b"]" * 100_000, "deep objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
          "deep in a field": b'{"query": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"}
HOSTILE = [  # (route, raw body or JSON value, what it is)
    ("/search", {"queries": ["apple"] * 5}, "too many queries"),
    ("/search", {"queries": ["apple"] * 100_000}, "100k queries (over the body limit)"),
    ("/search", {"query": "apple", "top_k": 11}, "top_k over the limit"),
    ("/search", {"query": "apple", "top_k": 10 ** 30}, "top_k huge"),
    ("/search", b'{"query": "apple", "top_k": ' + b"9" * 5000 + b"}", "a 5000-digit number"),
    ("/search", b'{"query": "apple", "top_k": NaN}', "NaN"),
    ("/search", b'{"query": "apple", "top_k": 1e999}', "Infinity"),
    ("/search", {"query": "apple", "top_k": 2.5}, "fractional top_k"),
    ("/search", {"query": "apple", "top_k": "5"}, "top_k a string"),
    ("/search", {"query": "apple", "top_k": True}, "top_k a boolean"),
    ("/search", {"query": "apple", "with_text": "yes"}, "with_text a string"),
    ("/search", {"query": "x" * 201}, "a long query"),
    ("/search", {"query": "x" * 19_000}, "a very long query"),
    ("/search", {"query": ""}, "empty query"),
    ("/search", {"query": " \t\n\u3000\u2028\x1c"}, "whitespace-only query"),
    ("/search", {"queries": ["apple", ""]}, "an empty query among others"),
    ("/search", {"queries": []}, "no queries"),
    ("/search", {"query": None}, "null query"),
    ("/search", {"query": "apple", "queries": ["river"]}, "both query and queries"),
    ("/search", {}, "neither query nor queries"),
    ("/search", {"query": 5}, "query a number"),
    ("/search", {"query": ["apple"]}, "query a list"),
    ("/search", {"queries": "apple"}, "queries a string"),
    ("/search", {"queries": [["apple"]]}, "queries nested"),
    ("/search", {"query": "apple", "extra": 1}, "an unknown field"),
    ("/search", {"query": "apple", "\ud800": 1}, "an unknown field named by a lone surrogate"),
    ("/search", b'{"query": "\\ud800 apple"}', "a lone surrogate"),
    ("/search", b'{"query": "\\udfff"}', "a lone low surrogate"),
    ("/search", b'{"query": "\xff\xfe apple"}', "bytes that are not UTF-8 in a string"),
    ("/search", b"\xff\xfe\x00garbage", "bytes that are not UTF-8"),
    ("/search", "{\"query\": \"caf\u00e9\"}".encode("latin-1"), "Latin-1, not UTF-8"),
    ("/search", b'{"query": "apple"', "truncated JSON"),
    ("/search", b'{"query": "apple"} trailing', "trailing garbage"),
    ("/search", b'{"query": "a\x01b"}', "a raw control character"),
    ("/search", b"", "an empty body"),
    ("/search", b"null", "null"),
    ("/search", b"[]", "an array"),
    ("/search", b'"apple"', "a string"),
    ("/search", b"12", "a number"),
    *[("/search", body, name) for name, body in NESTED.items()],
    ("/score", {"items": []}, "no items"),
    ("/score", {"items": [{"question": "q", "positive": "p"}] * 4}, "too many items"),
    ("/score", {"items": [{"question": "q", "positive": "p", "negatives": ["n"] * 4}]}, "too many negatives"),
    ("/score", {"items": [{"question": "q", "positive": "p", "negatives": ["n"] * 50_000}]}, "50k negatives"),
    ("/score", {"items": [{"question": "q", "positive": "p" * 201}]}, "a long positive"),
    ("/score", {"items": [{"question": "q", "positive": {"title": "t", "text": "p" * 201}}]}, "a long passage text"),
    ("/score", {"items": [{"question": " ", "positive": "p"}]}, "a blank question"),
    ("/score", {"items": [{"question": "q", "positive": {"title": "t"}}]}, "a passage without text"),
    ("/score", {"items": [{"question": "q", "positive": {"title": "\ud800", "text": "p"}}]}, "a lone surrogate in a title"),
    ("/score", {"items": [{"question": "q", "positive": "p", "negatives": ["\udc00"]}]}, "a lone surrogate in a negative"),
    ("/score", {"items": [{"question": "q", "positive": "p", "negatives": {"a": "b"}}]}, "negatives an object"),
    ("/score", {"items": [{"question": "q", "positive": 3}]}, "positive a number"),
    ("/score", {"items": {"question": "q"}}, "items an object"),
    ("/score", {"items": [{"question": "q", "positive": "p"}], "in_batch": "true"}, "in_batch a string"),
    ("/encode", {"texts": []}, "no texts"),
    ("/encode", {"texts": ["a"] * 5}, "too many texts"),
    ("/encode", {"texts": ["a"], "kind": "image"}, "an unknown kind"),
    ("/encode", {"texts": [{"text": "a"}], "kind": "query"}, "a passage as a query"),
    ("/encode", {"texts": [{"text": "\ud800"}], "kind": "passage"}, "a lone surrogate in a passage"),
    ("/encode", {"texts": None}, "texts null"),
    ("/encode", {"texts": ["a" * 201]}, "a long text"),
]


def _raw(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def limited(art):
    with TestClient(create_app(Settings(index=art.index_a, checkpoint=art.ckpt, device="cpu", batch_max_wait_ms=1,
                                        api_key=KEY, **LIMITS))) as c:
        yield c


def test_hostile_bodies_get_a_4xx_with_a_message(limited):
    statuses = Counter()
    for route, body, what in HOSTILE:
        r = limited.post(route, content=_raw(body), headers={"content-type": "application/json", "X-API-Key": KEY})
        statuses[r.status_code] += 1
        assert 400 <= r.status_code < 500, f"{what}: {r.status_code} {r.text[:200]}"
        detail = r.json()["detail"]
        assert isinstance(detail, str) and len(detail) > 5, f"{what}: {detail!r}"
    # and the server still answers normal requests
    assert limited.post("/search", json={"query": "apple river"}, headers={"X-API-Key": KEY}).status_code == 200
    record("hostile bodies", inputs=len(HOSTILE), statuses=dict(statuses))


def test_a_bad_text_in_a_batch_fails_only_its_own_request(art):
    """Dynamic batching encodes concurrent queries together; when one of them cannot be encoded,
    only its request fails (the batch is encoded again one text at a time)."""
    from dpr_service.api.batching import QueryBatcher

    calls = []

    def encode(texts):
        calls.append(list(texts))
        if "bad" in texts:
            raise ValueError("cannot encode")
        return np.ones((len(texts), 2), dtype=np.float32)

    async def main():
        b = QueryBatcher(encode, max_size=8, max_wait_ms=50, queue_max=64)
        b.start()
        results = await asyncio.gather(b.submit(["good"]), b.submit(["bad"]), b.submit(["fine", "ok"]), return_exceptions=True)
        await b.stop()
        return results

    good, bad, pair = asyncio.run(main())
    assert isinstance(bad, ValueError) and good.shape == (1, 2) and pair.shape == (2, 2)
    assert calls[0] == ["good", "bad", "fine", "ok"]  # they were batched together first


def test_oversized_and_chunked_bodies_are_refused_before_they_are_read(forkserver, art):
    """A real server: a Content-Length over the limit gets 413 before the body is sent; a chunked
    body (no Content-Length) gets 413 once it passes the limit, not at its end; the server's memory
    does not grow with what clients try to send."""
    limit = 100_000
    port = free_port()
    pid = forkserver.spawn("serve", port=port, index=art.index_a, checkpoint=art.ckpt, device="cpu", max_body_bytes=limit)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, pid)
        rss0 = overload.rss_mb(pid)
        sent_before_413 = []

        def attempt(head: bytes, chunk: bytes, total: int) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(head)
                s.setblocking(False)
                sent, answer = 0, b""
                while sent < total:
                    try:
                        answer += s.recv(65536)
                    except BlockingIOError:
                        pass
                    if answer:
                        break
                    try:
                        sent += s.send(chunk)
                    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                        time.sleep(0.001)
                    time.sleep(0.0005)
                s.setblocking(True)
                while b"\r\n\r\n" not in answer:
                    more = s.recv(65536)
                    if not more:
                        break
                    answer += more
                sent_before_413.append(sent)
                return answer

        big = 50_000_000
        for _ in range(5):
            answer = attempt(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % big, b"x" * 16384, big)
            assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
        declared = sent_before_413[:]
        chunk = b"%x\r\n%s\r\n" % (16384, b"y" * 16384)
        for _ in range(5):
            answer = attempt(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n", chunk, big)
            assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
        chunked = sent_before_413[len(declared):]
        # a small chunked body still works (the guard replays what it counted)
        body = json.dumps({"query": "apple river", "with_text": False}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        rss1 = overload.rss_mb(pid)
        # a 50 MB body is refused within a few socket buffers of data, and none of it is kept
        assert max(declared) < 8_000_000 and max(chunked) < 8_000_000, (declared, chunked)
        assert rss1 - rss0 < 50, (rss0, rss1)
        assert httpx.get(f"{base}/healthz").status_code == 200
    finally:
        sigkill(forkserver, pid)
    record("oversized bodies", limit_bytes=limit, attempts=10, declared_bytes=big,
           sent_before_413_content_length_max=max(declared), sent_before_413_chunked_max=max(chunked),
           rss_growth_mb=round(rss1 - rss0, 1))


# ----------------------------------------------------------------------------- auth


def test_every_path_but_the_open_ones_refuses_a_missing_or_wrong_key(art):
    """Every route the app has (the docs and the schema too), unknown paths and every method: a
    missing or wrong key gets 401, before the body is parsed or its size checked."""
    wrong = ["", "x", KEY[:-1], KEY + "x", KEY.upper(), " " + KEY, KEY * 50, "\u00e9" + KEY[1:]]
    with TestClient(create_app(Settings(index=art.index_a, checkpoint=art.ckpt, device="cpu", api_key=KEY))) as c:
        paths = set(app_routes(c.app)) | {"/nope", "/search/", "/admin", "/docs/", "/static/x", "/healthz/x"}
        tried = 0
        for path in sorted(paths):
            for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
                if path in OPEN_ROUTES:
                    continue
                variants = [{}] + [{"X-API-Key": w} for w in wrong] + [{"Authorization": f"Bearer {w}"} for w in wrong[1:3]]
                variants += [{"Authorization": f"Basic {KEY}"}, {"X-API-Key": "", "Authorization": "Bearer"}]
                for headers in variants:
                    r = c.request(method, path, headers={**{k: v.encode() for k, v in headers.items()}, "content-type": "application/json"},
                                  content=b"{not json" if method in ("POST", "PUT", "PATCH") else None)
                    tried += 1
                    assert r.status_code == 401, (method, path, headers, r.status_code)
                    if method != "HEAD":
                        body = r.json()  # /v1/...: OpenAI's error shape (docs/openai.md)
                        assert (body["error"]["message"] if path.startswith("/v1/") else body["detail"]).startswith("missing or wrong API key")
        # an oversized body without the key: 401 too, nothing read
        r = c.post("/search", content=b"x", headers={"content-length": "999999999"})
        assert r.status_code == 401
        for path in sorted(OPEN_ROUTES):
            assert c.get(path).status_code == 200, path
        assert c.get("/openapi.json", headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/docs", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    record("auth", requests_without_a_valid_key=tried, paths=len(paths))


def test_the_key_check_is_constant_time(monkeypatch):
    """Both sides are hashed and the 32-byte digests compared with hmac.compare_digest, whatever
    the given key's length or content; the check has no other comparison of the keys."""
    import dpr_service.api.guard as guard

    seen = []
    real = guard.hmac.compare_digest
    monkeypatch.setattr(guard.hmac, "compare_digest", lambda a, b: (seen.append((type(a), len(a), len(b))), real(a, b))[1])
    for given in ["", "a", KEY[:-1], KEY, KEY + "x", "x" * 10_000, "\u00e9\u00e8"]:
        assert guard.check_key(KEY, given, "") == (given == KEY)
        assert guard.check_key(KEY, "", f"Bearer {given}") == (given == KEY)
    assert seen and set(seen) == {(bytes, 32, 32)}
    fn = next(n for n in ast.walk(ast.parse(Path(guard.__file__).read_text())) if isinstance(n, ast.FunctionDef) and n.name == "check_key")
    compares = [ast.unparse(n) for n in ast.walk(fn) if isinstance(n, ast.Compare)]
    assert compares == ["expected is None"], compares  # no ==/!= on keys anywhere in the check
    assert "check_key(" in (ROOT / "dpr_service" / "api" / "deps.py").read_text()  # the route-level check calls it
    others = [p for p in (ROOT / "dpr_service" / "api").rglob("*.py") if p.name != "guard.py"]
    assert others and not [p for p in others if "compare_digest" in p.read_text()]  # one implementation, the guard's


# ----------------------------------------------------------------------------- schemathesis


try:
    import schemathesis
    from hypothesis import HealthCheck
    from hypothesis import settings as hypothesis_settings
except ImportError:  # the `test` extra installs it
    schemathesis = None

FUZZED: Counter = Counter()
FUZZ_SETTINGS = dict(device="cpu", batch_max_wait_ms=1, api_key=KEY)


FUZZ_TARGET = AsgiForward()  # to the app under test, which the fixture below sets


@pytest.fixture(scope="module")
def fuzz_app(art):
    """The app under test, on the tiny model and index (schemathesis runs its lifespan once)."""
    FUZZ_TARGET.target = create_app(Settings(index=art.index_a, checkpoint=art.ckpt, **FUZZ_SETTINGS))
    return FUZZ_TARGET


@pytest.fixture(scope="module", autouse=True)
def _report_fuzzing():
    yield
    if FUZZED:
        record("schemathesis", requests=sum(FUZZED.values()), by_operation=dict(sorted(FUZZED.items())),
               max_fuzzing_examples_per_operation=FUZZ_EXAMPLES, failures=0)


if schemathesis is not None:
    # The published schema depends only on the settings (limits, key), not on the artifacts, so it is
    # taken at collection from an app that loads nothing; the requests go to `fuzz_app` (forwarded).
    # (schemathesis.pytest.from_fixture would defer this, but needs pytest < 9.2.)
    fuzz_schema = schemathesis.openapi.from_dict(create_app(Settings(index=None, **FUZZ_SETTINGS)).openapi())
    fuzz_schema.app = FUZZ_TARGET

    @fuzz_schema.parametrize()
    @hypothesis_settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=not SOAK, database=None,
                         suppress_health_check=list(HealthCheck))
    def test_schemathesis_every_check_against_the_apps_own_schema(case, fuzz_app):
        """Every operation, positive and negative data, every check schemathesis has (no 5xx,
        status codes, content types, headers and bodies as documented, valid data accepted,
        invalid data rejected, the key not ignored)."""
        FUZZED[case.operation.label] += 1
        case.call_and_validate(headers={"X-API-Key": KEY})
else:
    def test_schemathesis_every_check_against_the_apps_own_schema():
        pytest.skip("schemathesis is not installed: pip install -e '.[test]'")


# ----------------------------------------------------------------------------- overload


def test_overload_at_three_times_capacity_then_a_steady_rate(forkserver, art):
    """A real server (default settings, with a key) on loopback: measure its capacity, offer 3x that
    for a few seconds (open loop), then a constant rate at half of it. Under overload every answer is
    200 or 503 with Retry-After, memory stays bounded and latency is normal again within seconds of
    the burst; at the constant rate no request fails."""
    port = free_port()
    pid = forkserver.spawn("serve", port=port, index=art.index_a, checkpoint=art.ckpt, device="cpu", api_key=KEY)
    try:
        wait_ready(f"http://127.0.0.1:{port}", pid)
        results = overload.run_all("127.0.0.1", port, pid, KEY, overload=3.0, clients=32, capacity_seconds=4,
                                   burst_seconds=6, steady_fraction=0.5, steady_seconds=STEADY_SECONDS, recovery_seconds=15,
                                   log=lambda line: print("[overload]", line))
    finally:
        sigkill(forkserver, pid)
    ov, steady = results["overload"], results["steady"]
    record("overload", **results)
    assert ov["failures"] == 0 and set(ov["statuses"]) <= {"200", "503"}, ov
    assert ov["statuses"].get("503", 0) > 0.1 * ov["sent"], "the burst did not overload the server"
    assert ov["rss_peak_mb"] - results["idle"]["rss_mb"] < 150, ov
    assert ov["recovery_s"] is not None and ov["recovery_s"] < 5, ov
    assert steady["failures"] == 0 and steady["statuses"] == {"200": steady["sent"]}, steady
