"""Data sets under DPR_DATA_ROOT, by kind of attack (issue 30, item 4; dpr_service/api/jobs/data.py,
routes/datasets.py): degenerate and conflicting zip entries are 422 naming the entry (never 500),
the entry count is bounded and refused fast, the uploads' lock is held only for the final rename,
names are matched whole and hidden names are never data (nor splits), crash leftovers are swept at
start, a training file is checked streaming (memory by the line, not the file), and the data set
routes run in the admin lane (503 with Retry-After when it is full)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import write_beir, write_dpr, write_plain
from dpr_service.api.app import create_app
from dpr_service.api.jobs import JobSettings, data
from dpr_service.api.settings import Settings
from dpr_service.core.formats import DataError, check_beir_dir, read_corpus, read_eval_data, read_train_data

ADMIN = "admin-s3cret"
H = {"X-Admin-Key": ADMIN}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def beir_files(tmp_path_factory) -> dict[str, bytes]:
    """A small valid BEIR directory, as zip entries (name -> bytes)."""
    src = write_beir(tmp_path_factory.mktemp("beir") / "beir", n=12)
    return {str(p.relative_to(src)): p.read_bytes() for p in src.rglob("*") if p.is_file()}


def zip_of(entries: dict[str, bytes] | list[tuple[str, bytes]]) -> bytes:
    """A zip holding ``entries`` in order (a name ending in '/' is a directory entry)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in (entries.items() if isinstance(entries, dict) else entries):
            z.writestr(zipfile.ZipInfo(name), content)
    return buf.getvalue()


def client(root: Path, tmp: Path, settings: Settings | None = None, **overrides) -> TestClient:
    js = JobSettings(admin_key=ADMIN, jobs_dir=tmp / "state", data_root=root, jobs_poll_s=0.1, **overrides)
    return TestClient(create_app(settings or Settings(index=None, device="cpu"), js))


def on_disk(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ----------------------------------------------------------------------------- zips


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_degenerate_and_conflicting_zip_entries_are_422_naming_the_entry(beir_files, tmp_path):
    """Each of these answered 500 (IsADirectoryError, FileExistsError, NotADirectoryError,
    ENAMETOOLONG) before; now 422 in the documented error shape, naming the entry, nothing left on disk."""
    root = tmp_path / "data"
    root.mkdir()
    deep = "d/" * 2000 + "f.txt"
    cases = {
        "dot": [(".", b"x")],
        "dot-slash": [("./", b"")],
        "empty": [("", b"x")],
        "dot-part": [("top/./corpus2.jsonl", b"x")],
        "empty-part": [("top//corpus2.jsonl", b"x")],
        "long": [("n" * 300 + ".txt", b"x")],
        "deep": [(deep, b"x")],
        "file-then-dir": [("extra", b"x"), ("extra/inner.txt", b"y")],
        "dir-over-file": [("qrels/dev.tsv/", b"")],
        "twice": [("corpus.jsonl", beir_files["corpus.jsonl"])],
        "control": [("bad\nname.txt", b"x")],
    }
    with client(root, tmp_path) as c:
        for case, extra in cases.items():
            entries = list(beir_files.items()) + extra
            r = c.post(f"/datasets?name={case}", headers=H, content=zip_of(entries))
            assert r.status_code == 422, (case, r.status_code, r.text[:300])
            body = r.json()
            assert body["errors"][0]["field"] == "body" and body["detail"].startswith("body: zip entry "), (case, body)
            named = extra[-1][0] if case != "file-then-dir" else "extra"
            assert repr(named[:60])[:-1] in body["detail"] or named[:60] in body["detail"], (case, body["detail"][:300])
            assert on_disk(root) == [".uploads.lock"] or on_disk(root) == [], (case, on_disk(root))
        # what held keeps holding: traversal, absolute, drive letters, links
        for case, name in (("up", "../evil.txt"), ("abs", "/tmp/evil.txt"), ("drive", "C:/evil.txt")):
            r = c.post(f"/datasets?name={case}", headers=H, content=zip_of([*beir_files.items(), (name, b"x")]))
            assert r.status_code == 422 and "escapes" in r.json()["detail"], (case, r.text)
        link = zipfile.ZipInfo("corpus2.jsonl")
        link.external_attr = (0o120777 << 16)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for name, content in beir_files.items():
                z.writestr(name, content)
            z.writestr(link, "/etc/passwd")
        r = c.post("/datasets?name=link", headers=H, content=buf.getvalue())
        assert r.status_code == 422 and "symbolic link" in r.json()["detail"]
        # and a good one (entries in a top directory, with directory entries) is stored
        good = [("top/", b""), ("top/qrels/", b"")] + [(f"top/{n}", b) for n, b in beir_files.items()]
        r = c.post("/datasets?name=good", headers=H, content=zip_of(good))
        assert r.status_code == 201, r.text
        assert sorted(p.name for p in (root / "good").iterdir()) == ["corpus.jsonl", "qrels", "queries.jsonl"]
    assert [n for n in on_disk(root) if n.startswith(".upload-")] == []


def many_entries_zip(beir_files: dict[str, bytes], n: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # stored, empty: 9.5 MB for 100k entries
        for name, content in beir_files.items():
            z.writestr(name, content)
        for i in range(n):
            z.writestr(f"pad/{i}.txt", b"")
    return buf.getvalue()


def test_a_zip_of_100k_empty_files_is_refused_in_seconds(beir_files, tmp_path):
    """It was stored after 128 s (holding the uploads' lock all along); DPR_MAX_ZIP_ENTRIES (default
    5000) refuses it from the central directory, before anything is unpacked."""
    root = tmp_path / "data"
    blob = many_entries_zip(beir_files, 100_000)
    assert 9_000_000 < len(blob) < 10_500_000
    with client(root, tmp_path) as c:
        start = time.monotonic()
        r = c.post("/datasets?name=many", headers=H, content=blob)
        took = time.monotonic() - start
    assert r.status_code == 413 and "DPR_MAX_ZIP_ENTRIES" in r.json()["detail"], r.text
    assert took < 10, f"refused after {took:.1f} s"
    assert not (root / "many").exists() and [n for n in on_disk(root) if n.startswith(".upload-")] == []


def test_the_entry_bound_is_a_setting_and_holds_when_the_end_record_lies(beir_files, tmp_path, monkeypatch):
    """DPR_MAX_ZIP_ENTRIES from the environment; a zip whose end record claims 1 entry while its
    central directory holds 400 is counted by its directory, as zipfile reads it."""
    monkeypatch.setenv("DPR_MAX_ZIP_ENTRIES", "100")
    assert JobSettings(admin_key=ADMIN).max_zip_entries == 100
    root = tmp_path / "data"
    blob = bytearray(many_entries_zip(beir_files, 400))
    assert blob[-22:-18] == b"PK\x05\x06"
    blob[-14:-10] = (1).to_bytes(2, "little") * 2  # entries on this disk, entries in total
    with client(root, tmp_path, max_zip_entries=100) as c:
        r = c.post("/datasets?name=lying", headers=H, content=bytes(blob))
        assert r.status_code == 413 and "more than 100 entries" in r.json()["detail"], r.text
        ok = many_entries_zip(beir_files, 90)
        assert c.post("/datasets?name=fits", headers=H, content=ok).status_code == 201


def test_the_uploads_lock_is_not_held_while_a_zip_is_unpacked_and_checked(beir_files, tmp_path, monkeypatch):
    """While one zip is being checked, another upload (another name) is stored: the lock covers the
    final rename only. Before, the second waited for the whole of the first's check."""
    root = tmp_path / "data"
    root.mkdir()
    in_check, second_done = threading.Event(), threading.Event()
    real = data._check_beir

    def slow_check(path):
        in_check.set()
        second_done.wait(timeout=10)
        return real(path)

    monkeypatch.setattr(data, "_check_beir", slow_check)
    up = tmp_path / "up"
    up.mkdir()
    (up / "a.zip").write_bytes(zip_of(beir_files))
    write_plain(up / "b.jsonl", n=6)
    order: list[str] = []
    first = threading.Thread(target=lambda: (data.ingest(root, "first", up / "a.zip", 10**8), order.append("first")))
    first.start()
    assert in_check.wait(timeout=30)
    data.ingest(root, "second", up / "b.jsonl", 10**8)
    order.append("second")
    second_done.set()
    first.join(timeout=30)
    assert order == ["second", "first"], order
    assert (root / "first" / "corpus.jsonl").is_file() and (root / "second.jsonl").is_file()


# ----------------------------------------------------------------------------- names


def test_names_are_matched_whole_and_hidden_names_are_never_data(beir_files, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_plain(root / "train.jsonl", n=6)
    hidden = root / ".upload-abcd1234"
    hidden.mkdir()
    write_plain(hidden / "half.jsonl", n=3)
    (root / ".uploads.lock").write_bytes(b"")
    os.symlink(".upload-abcd1234", root / "alias")
    os.symlink("nothing-there", root / "dangling")
    line = (root / "train.jsonl").read_bytes()
    with client(root, tmp_path) as c:
        for name in ("abc\n", "abc\n.jsonl", ".upload-x", ".uploads.lock", ".hidden"):
            r = c.post("/datasets", params={"name": name}, headers=H, content=line)
            assert r.status_code == 422 and r.json()["errors"][0]["field"] == "name", (name, r.text)
        assert [n for n in on_disk(root) if "\n" in n] == []
        listed = [d["name"] for d in c.get("/datasets", headers=H).json()["datasets"]]
        assert listed == ["train.jsonl"], listed  # not the hidden ones, the link to one, nor a dangling link
    for name in (".upload-abcd1234/half.jsonl", ".uploads.lock", "alias/half.jsonl", "alias", "train.jsonl\n"):
        with pytest.raises(data.DataRefused) as refused:
            data.resolve_name(root, name, "train")
        assert refused.value.status == 422 and refused.value.field == "train", name
    assert data.resolve_name(root, "train.jsonl", "train") == (root / "train.jsonl").resolve()


@pytest.mark.parametrize("value", ["../../../../outside/secret", "a/b", "..", ".hidden", "dev\n", "dev\\x", "", " ",
                                   "a..b", "dev.", 3, None, ["dev"]])
def test_split_names_follow_the_data_name_rules(value):
    with pytest.raises(data.DataRefused) as refused:
        data.check_split_name(value, "train_split")
    assert refused.value.status == 422 and refused.value.field == "train_split"


def test_plain_split_names_pass():
    for value in ("train", "dev", "test", "test-small", "dev_2", "v1.1"):
        assert data.check_split_name(value, "dev_split") == value


# ----------------------------------------------------------------------------- crash leftovers


def test_unpack_temporaries_a_killed_server_left_are_swept_at_start(tmp_path):
    """Leftovers of a killed unpack (a few minutes old, unclaimed; and the earlier ``.<name>.tmp-<pid>-*``
    directories of a dead process) are removed at start; a claimed one (an upload in progress in
    another worker) and fresh ones are kept."""
    root = tmp_path / "data"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftovers = [root / ".upload-killed-unpack", root / f".mine.tmp-{dead.pid}-0123abcd", root / ".upload-killed-body"]
    for path in leftovers[:2]:
        (path / "qrels").mkdir(parents=True)
        (path / "corpus.jsonl").write_bytes(b"{}\n")
    leftovers[2].write_bytes(b"half")
    live = root / ".upload-live"
    live.mkdir()
    (root / ".upload-fresh").write_bytes(b"y")
    (root / ".uploads.lock").write_bytes(b"")
    (root / "kept.jsonl").write_bytes(b"z")
    minutes_ago = time.time() - 300
    for path in (*leftovers, live):
        os.utime(path, (minutes_ago, minutes_ago))
    holder = data.claim(live)
    try:
        with client(root, tmp_path):
            pass
    finally:
        os.close(holder)
    assert on_disk(root) == [".upload-fresh", ".upload-live", ".uploads.lock", "kept.jsonl"]
    # the upload being ingested is never swept from under it, however old and unclaimed
    write_plain(root / ".upload-old-body", n=3)
    os.utime(root / ".upload-old-body", (minutes_ago, minutes_ago))
    assert data.ingest(root, "late", root / ".upload-old-body", 10**8)["name"] == "late.jsonl"


# ----------------------------------------------------------------------------- memory


def test_a_training_file_is_checked_by_the_readers_rules(tmp_path):
    """The streaming check refuses exactly what dpr train's reader refuses, with the same message."""
    write_plain(tmp_path / "plain.jsonl", n=5)
    records = json.loads(write_dpr(tmp_path / "dpr.json", n=5).read_text())
    good = (tmp_path / "plain.jsonl").read_text().splitlines(keepends=True)
    dpr = [json.dumps(r) + "\n" for r in records]
    files = {
        "plain.jsonl": "".join(good), "dpr.jsonl": "".join(dpr), "empty.jsonl": "\n\n",
        "bad-json.jsonl": good[0] + "{nope\n", "not-object.jsonl": good[0] + "[1]\n",
        "neither.jsonl": '{"x": 1}\n', "wrong-type.jsonl": good[0] + '{"query": 3, "positive": "p"}\n',
        "no-positive.jsonl": good[0] + '{"query": "q"}\n', "dpr-empty.jsonl": dpr[0] + '{"question": "q", "positive_ctxs": []}\n',
        "surrogate.jsonl": good[0] + '{"query": "\\ud800", "positive": "p"}\n',
        "list.json": json.dumps(records, indent=2), "bad-list.json": json.dumps(records[:2], indent=2) + "\n[{\"question\": 1}]",
        "bad-element.json": "[" + json.dumps(records[0]) + ',\n {"question": "q"}]',
    }
    (tmp_path / "bytes.jsonl").write_bytes(good[0].encode() + b'{"query": "\xff", "positive": "p"}\n')
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for name in [*files, "bytes.jsonl"]:
        path = tmp_path / name
        try:
            read_train_data(path)
            expected = None
        except DataError as e:
            expected = str(e)
        try:
            data.check_train_file(path)
            got = None
        except DataError as e:
            got = str(e)
        assert got == expected, name


def reader_verdict(root: Path) -> str | None:
    """What dpr train's and dpr eval's readers say of a BEIR directory: the corpus, then each split
    (train as training data, others as evaluation data): the oracle of the streaming check."""
    try:
        check_beir_dir(root)
        read_corpus(root)
        for qrels in sorted((root / "qrels").glob("*.tsv")):
            (read_train_data if qrels.stem == "train" else read_eval_data)(root, qrels.stem)
    except DataError as e:
        return str(e)
    return None


BEIR_DEFECTS = {
    "good": {},
    "duplicate-id": {"corpus.jsonl": lambda t: t + t.splitlines(keepends=True)[0]},
    "empty-corpus": {"corpus.jsonl": lambda t: "\n"},
    "bad-json": {"corpus.jsonl": lambda t: t + "{nope\n"},
    "no-text": {"corpus.jsonl": lambda t: t + '{"_id": "z", "title": "", "text": " "}\n'},
    "id-null": {"corpus.jsonl": lambda t: t + '{"_id": null, "text": "x"}\n'},
    "query-no-id": {"queries.jsonl": lambda t: t + '{"text": "q"}\n'},
    "query-empty": {"queries.jsonl": lambda t: t + '{"_id": "qq", "text": ""}\n'},
    "train-unknown-query": {"qrels/train.tsv": lambda t: t + "nobody\td0\t1\n"},
    "train-all-zero": {"qrels/train.tsv": lambda t: t.replace("\t1\n", "\t0\n")},
    "train-only-missing-passages": {"qrels/train.tsv": lambda t: "query-id\tcorpus-id\tscore\nq0\tgone\t1\n"},
    "dev-unknown-query": {"qrels/dev.tsv": lambda t: t + "nobody\td0\t1\n"},
    "dev-all-unknown": {"qrels/dev.tsv": lambda t: "query-id\tcorpus-id\tscore\nnobody\td0\t1\n"},
    "dev-two-columns": {"qrels/dev.tsv": lambda t: t + "q1\td1\n"},
    "dev-all-zero": {"qrels/dev.tsv": lambda t: t.replace("\t1\n", "\t0\n")},
    "dev-empty": {"qrels/dev.tsv": lambda t: "query-id\tcorpus-id\tscore\n"},
    "score-nan": {"qrels/dev.tsv": lambda t: t + "q1\td1\tnan\n"},
    "bytes": {"queries.jsonl": lambda t: t + "\udcff\n"},
    "no-queries": {"queries.jsonl": None},
    "no-corpus": {"corpus.jsonl": None},
}


@pytest.mark.parametrize("defect", list(BEIR_DEFECTS))
def test_a_beir_zip_is_checked_by_the_readers_rules_without_holding_the_corpus(defect, tmp_path):
    root = write_beir(tmp_path / "beir", n=8, splits=("train", "dev", "test"))
    for name, change in BEIR_DEFECTS[defect].items():
        if change is None:
            (root / name).unlink()
        else:
            (root / name).write_bytes(change((root / name).read_text()).encode("utf-8", "surrogateescape"))
    expected = reader_verdict(root)
    try:
        data._check_beir(root)
        got = None
    except DataError as e:
        got = str(e)
    assert got == expected, defect
    assert (expected is None) == (defect == "good")


PEAK_RSS = textwrap.dedent("""
    import sys
    from pathlib import Path
    from dpr_service.api.jobs import data

    def status(key):  # kB
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

    root, upload = Path(sys.argv[1]), Path(sys.argv[2])
    with open("/proc/self/clear_refs", "w") as fh:  # the peak (VmHWM) starts again from the current RSS
        fh.write("5")
    before = status("VmRSS")
    data.ingest(root, "big", upload, 10**10)
    print((status("VmHWM") - before) * 1024)
""")


def peak_rss_growth_of_an_upload(tmp_path: Path, megabytes: int) -> tuple[int, int]:
    """(bytes of the training file, growth of the peak RSS of a child that ingests it: its peak
    during the ingest less its RSS before, in bytes; Linux's /proc)."""
    root, upload = tmp_path / "root", tmp_path / "big.upload"
    root.mkdir()
    base = json.loads((write_plain(tmp_path / "seed.jsonl", n=1)).read_text())
    with open(upload, "w") as fh:
        i = 0
        while fh.tell() < megabytes * 1_000_000:
            line = {"query": f"{base['query']} {i}", "positive": {"text": f"{base['positive']['text']} {i}", "id": f"p{i}"},
                    "negatives": [f"negative {i} {j} " + "w" * 40 for j in range(4)]}
            fh.write(json.dumps(line) + "\n")
            i += 1
    size = upload.stat().st_size
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(root), str(upload)], capture_output=True, text=True,
                         cwd=ROOT, timeout=600, check=True)
    return size, int(out.stdout.strip().splitlines()[-1])


def test_checking_a_training_upload_costs_memory_by_the_line_not_by_the_file(tmp_path):
    """A 20 MB JSONL upload: the check's peak RSS grows by less than 40 MB (read whole, as
    read_train_data reads it, it grew by 148 MB; checked streaming, by 0.1 MB)."""
    size, growth = peak_rss_growth_of_an_upload(tmp_path, 20)
    assert growth < 40_000_000, f"peak RSS grew by {growth / 1e6:.0f} MB checking {size / 1e6:.0f} MB"
    assert (tmp_path / "root" / "big.jsonl").stat().st_size == size


def test_checking_a_beir_zip_does_not_hold_its_corpus(tmp_path):
    """A zip of a BEIR set with a 52 MB corpus (100k passages): the check's peak RSS grows by less
    than 40 MB (with the corpus read whole, as before, it grew by 85 MB; streaming, by 12 MB)."""
    root, upload = tmp_path / "root", tmp_path / "beir.upload"
    root.mkdir()
    with zipfile.ZipFile(upload, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("corpus.jsonl", "w") as fh:
            for i in range(100_000):
                fh.write((json.dumps({"_id": f"d{i}", "title": f"title {i}", "text": f"passage {i} " + "lorem ipsum " * 40})
                          + "\n").encode())
        z.writestr("queries.jsonl", "".join(json.dumps({"_id": f"q{i}", "text": f"question {i}"}) + "\n" for i in range(500)))
        z.writestr("qrels/train.tsv", "".join(f"q{i}\td{i}\t1\n" for i in range(400)))
        z.writestr("qrels/dev.tsv", "".join(f"q{i}\td{i}\t1\n" for i in range(400, 500)))
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(root), str(upload)], capture_output=True, text=True,
                         cwd=ROOT, timeout=600, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    assert (root / "big" / "corpus.jsonl").stat().st_size > 50_000_000
    assert growth < 40_000_000, f"peak RSS grew by {growth / 1e6:.0f} MB"


# ----------------------------------------------------------------------------- lanes


def test_dataset_file_work_runs_in_the_admin_lane(tmp_path, monkeypatch):
    """With the admin lane's one thread busy and no queue, the next /datasets call is 503 with
    Retry-After (naming the lane), not a wait in a pool shared with everything else."""
    from dpr_service.api.routes import datasets

    root = tmp_path / "data"
    root.mkdir()
    entered, release = threading.Event(), threading.Event()
    real = datasets.list_data

    def slow_listing(path):
        entered.set()
        release.wait(timeout=20)
        return real(path)

    monkeypatch.setattr(datasets, "list_data", slow_listing)
    settings = Settings(index=None, device="cpu", lane_admin_threads=1, lane_admin_queue=0)
    with client(root, tmp_path, settings) as c:
        results = []
        first = threading.Thread(target=lambda: results.append(c.get("/datasets", headers=H).status_code))
        first.start()
        assert entered.wait(timeout=20)
        try:
            r = c.get("/datasets", headers=H)
            u = c.post("/datasets?name=x", headers=H, content=b'{"query": "q", "positive": "p"}\n')
        finally:
            release.set()
            first.join(timeout=30)
        assert r.status_code == 503 and "Retry-After" in r.headers and r.json()["lane"] == "admin", r.text
        assert u.status_code == 503 and "Retry-After" in u.headers, u.text
        assert results == [200]
    assert [n for n in on_disk(root) if n.startswith(".upload-")] == []
