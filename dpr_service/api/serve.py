"""``dpr serve``: run the app under uvicorn. Flags become ``DPR_*`` settings for the workers."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None, prog: str = "dpr serve") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Serve retrieval and the DPR loss over REST (uvicorn).")
    parser.add_argument("--index", help="index artifact directory (or DPR_INDEX)")
    parser.add_argument("--checkpoint", help="checkpoint directory (default: the one named in the manifest; or DPR_CHECKPOINT)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (each loads the model)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.index:
        os.environ["DPR_INDEX"] = args.index
    if args.checkpoint:
        os.environ["DPR_CHECKPOINT"] = args.checkpoint
    if not os.environ.get("DPR_INDEX"):
        print(f"{prog}: error: give --index or set DPR_INDEX", file=sys.stderr)
        return 2
    from .settings import get_settings

    try:
        get_settings()
    except Exception as e:  # pydantic ValidationError for a bad DPR_* value
        print(f"{prog}: error: bad DPR_* setting: {e}", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run("dpr_service.api.app:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=args.log_level)
    return 0
