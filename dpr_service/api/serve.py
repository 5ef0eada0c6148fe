"""``dpr serve``: run the app under uvicorn. Flags become ``DPR_*`` settings for the workers.

The index is checked before uvicorn starts: a path that does not exist, a checkpoint given for an
index, or a directory without a readable manifest is a one-line error and exit status 2, unless
``--wait-for-index`` (``DPR_WAIT_FOR_INDEX=1``) says it may appear later (then the server starts,
answers 503 on ``/readyz`` and checks every second until it loads).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    """The command line of ``dpr serve`` (argparse exits 2 on a bad flag)."""
    parser = argparse.ArgumentParser(prog=prog, description="Serve retrieval and the DPR loss over REST (uvicorn).")
    parser.add_argument("--index", help="index artifact directory (or DPR_INDEX)")
    parser.add_argument("--checkpoint", help="checkpoint directory (default: the one named in the manifest; or DPR_CHECKPOINT)")
    parser.add_argument("--milvus-uri", help="answer /search from this Milvus instead of a FAISS index (or DPR_MILVUS_URI; "
                        "docs/milvus.md); the token comes from DPR_MILVUS_TOKEN")
    parser.add_argument("--collection", help="the Milvus collection or alias to serve (or DPR_MILVUS_COLLECTION)")
    parser.add_argument("--wait-for-index", action="store_true",
                        help="start even when the index is missing or unreadable, and load it once it is there "
                             "(or DPR_WAIT_FOR_INDEX=1); without it such an index is an error (exit 2)")
    parser.add_argument("--runtime", choices=("torch", "onnx", "onnx-int8"),
                        help="encode queries and passages with torch (default) or ONNX Runtime on the CPU, fp32 or "
                             "dynamic int8 (or DPR_RUNTIME); /score keeps torch")
    parser.add_argument("--onnx-dir", help="with --runtime onnx*: an export of the checkpoint (dpr export --format onnx; "
                        "or DPR_ONNX_DIR); default: exported at start and cached")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (each loads the model)")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "dpr serve") -> int:
    """Check the settings and the index, then serve until stopped. Returns 0, or 2 (with one line
    on stderr) for a missing ``--index``, a bad ``DPR_*`` value or an index that cannot be served."""
    args = parse_args(argv, prog)
    if args.index:
        os.environ["DPR_INDEX"] = args.index
    if args.checkpoint:
        os.environ["DPR_CHECKPOINT"] = args.checkpoint
    if args.wait_for_index:
        os.environ["DPR_WAIT_FOR_INDEX"] = "1"
    if args.runtime:
        os.environ["DPR_RUNTIME"] = args.runtime
    if args.onnx_dir:
        os.environ["DPR_ONNX_DIR"] = args.onnx_dir
    if args.milvus_uri:
        os.environ["DPR_MILVUS_URI"] = args.milvus_uri
    if args.collection:
        os.environ["DPR_MILVUS_COLLECTION"] = args.collection
    milvus = bool(os.environ.get("DPR_MILVUS_URI"))
    if milvus and not os.environ.get("DPR_MILVUS_COLLECTION"):
        print(f"{prog}: error: --milvus-uri needs --collection (or DPR_MILVUS_COLLECTION)", file=sys.stderr)
        return 2
    if not milvus and not os.environ.get("DPR_INDEX"):
        print(f"{prog}: error: give --index or set DPR_INDEX (or --milvus-uri and --collection)", file=sys.stderr)
        return 2
    from .jobs.settings import get_job_settings
    from .settings import get_settings

    try:
        settings = get_settings()
        get_job_settings()  # the training service's (DPR_ADMIN_KEY, DPR_JOBS_*): read by every worker too
    except Exception as e:  # pydantic ValidationError for a bad DPR_* value
        print(f"{prog}: error: bad DPR_* setting: {e}", file=sys.stderr)
        return 2
    missing = _missing_extra(settings)
    if missing:
        print(f"{prog}: error: {missing}", file=sys.stderr)
        return 2
    if not settings.wait_for_index and not milvus:  # a Milvus that is not up yet is waited for (503 until then)
        from dpr_service.core.artifact import ArtifactError, read_manifest

        try:
            read_manifest(settings.index)
        except ArtifactError as e:
            print(f"{prog}: error: --index {e} (or pass --wait-for-index to wait for it)", file=sys.stderr)
            return 2
    import uvicorn

    uvicorn.run("dpr_service.api.app:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=args.log_level, **uvicorn_options(settings))
    return 0


def uvicorn_options(settings) -> dict:
    """uvicorn's connection bounds from the settings: idle keep-alive connections close after
    ``DPR_KEEP_ALIVE_S``; past ``DPR_MAX_CONNECTIONS`` open connections and requests, uvicorn answers
    503. (Slow bodies are the Guard's: ``DPR_BODY_TIMEOUT_S``.)"""
    return {"timeout_keep_alive": settings.keep_alive_s, "limit_concurrency": settings.max_connections}


def _missing_extra(settings) -> str | None:
    """What the settings need that is not installed, as one line naming the extra; None if all is there."""
    import importlib.util

    needs = []
    if settings.milvus_uri:
        needs.append(("pymilvus", "--milvus-uri", "milvus"))
    if settings.runtime != "torch":
        needs.append(("onnxruntime", f"--runtime {settings.runtime}", "onnx"))
    for module, what, extra in needs:
        if importlib.util.find_spec(module) is None:
            return f"{what} needs {module}: pip install 'dpr-service[{extra}]'"
    return None
