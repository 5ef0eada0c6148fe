"""``dpr index build|add``, ``dpr eval``, ``dpr bm25`` and ``dpr mine``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys

from dpr_service.core.cli_checks import first_error, input_error, model_dir_error, output_error


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _size(text: str) -> str:
    from .factory import parse_size

    try:
        size = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, got {text!r}")
    return text


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return i, n


def _run(prog: str, fn, *problems: str | None) -> int:
    """Run a command; bad input of any known kind is one line on stderr and exit code 2. ``problems``
    (:mod:`dpr_service.core.cli_checks`' messages, or None) are the paths already found wrong: the first
    is reported before anything heavy is imported."""
    problem = first_error(*problems)
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("faiss.loader", "bm25s"):  # which CPU build FAISS loaded; bm25s's debug lines
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from dpr_service.core.checkpoint import CheckpointError
    from dpr_service.core.formats import DataError

    from dpr_service.core.artifact import ArtifactError
    from dpr_service.core.milvus import MilvusUnavailable

    try:
        return fn() or 0
    except (DataError, CheckpointError, ArtifactError, ValueError, ImportError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except MilvusUnavailable as e:  # not bad input: the same command may succeed later
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an --output under a file, a full disk, no permission: the path and the reason
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; encoded parts are kept, run the same command again to resume", file=sys.stderr)
        return 130


def _common_args(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """The flags every stage command shares (``dpr train`` has the same two): ``--device`` where a model
    runs, and ``--progress`` / ``--no-progress`` (progress bars on stderr; default on)."""
    if device:
        parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show progress bars on stderr (default: shown)")


def index_main(argv: list[str], prog: str = "dpr index") -> int:
    """``dpr index build|add|export`` (docs/index.md, docs/milvus.md): returns the exit status, 0 or 2 (one-line error); bad
    arguments exit 2 through argparse."""
    parser = argparse.ArgumentParser(prog=prog, description="Build or extend a FAISS index artifact.")
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="encode a corpus and build an index artifact")
    b.add_argument("--checkpoint", required=True, help="checkpoint directory (dpr train's last/ or best/)")
    b.add_argument("--corpus", required=True, help="corpus.jsonl, a BEIR directory or DPR's psgs .tsv")
    b.add_argument("--output", required=True, help="artifact directory to create")
    b.add_argument("--factory", default="auto", help="FAISS factory string (Flat, HNSW32, IVF4096,PQ64) or auto (default)")
    b.add_argument("--memory-budget", type=_size,
                   help="memory the finished index may use, for --factory auto (default 8GB); the build needs more: "
                        "the index plus its training sample and one 65,536-vector slice (the embeddings stay on disk)")
    b.add_argument("--batch-size", type=_positive_int, help="passages per encoder batch (default 512 on GPU, 64 on CPU)")
    b.add_argument("--shard", type=_shard, help="encode only slice i of n (i/n); the last shard to finish builds the index "
                   "(under torchrun: RANK/WORLD_SIZE, one GPU per rank)")
    b.add_argument("--part-size", "--chunk", dest="part_size", type=_positive_int,
                   help="passages per resumable embeddings file, a part (default 8192)")
    b.add_argument("--no-bm25", dest="bm25", action="store_false",
                   help="leave out the BM25 index of the same passages (then /search serves mode dense only; docs/index.md)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N: the encoder's device, and FAISS's GPU for "
                   "Flat and IVF indexes when faiss-gpu is installed (default auto)")
    _runtime_args(b)
    _common_args(b, device=False)
    a = sub.add_parser("add", help="add passages to an artifact (a new verified artifact)")
    a.add_argument("--index", required=True, help="artifact directory")
    a.add_argument("--corpus", required=True, help="passages to add (corpus.jsonl or .tsv); ids must be new")
    a.add_argument("--checkpoint", help="checkpoint (default: the one named in the manifest)")
    a.add_argument("--output", help="write the new artifact here instead of replacing --index")
    a.add_argument("--batch-size", type=_positive_int, help="passages per encoder batch (default 512 on GPU, 64 on CPU)")
    _runtime_args(a)
    _common_args(a)
    _export_args(sub.add_parser("export", help="copy an artifact into a Milvus collection (docs/milvus.md)"))
    args = parser.parse_args(argv)
    if args.action == "build":
        args.memory_budget = args.memory_budget or "8GB"
        problems = (model_dir_error("--checkpoint", args.checkpoint), input_error("--corpus", args.corpus),
                    output_error("--output", args.output))
    elif args.action == "add":
        problems = (input_error("--index", args.index), input_error("--corpus", args.corpus),
                    model_dir_error("--checkpoint", args.checkpoint) if args.checkpoint else None,
                    output_error("--output", args.output) if args.output else None)
    else:
        problems = (input_error("--index", args.index),)

    def go():
        import torch

        from .build import add, build

        if args.action == "export":
            return _export(args)
        if args.action == "build":
            shard, device = args.shard, args.device
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if world > 1 and shard is None:  # under torchrun: one shard per rank, each on its own GPU
                shard = (int(os.environ["RANK"]), world)
                if device == "auto" and torch.cuda.is_available():
                    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            out = build(args.checkpoint, args.corpus, args.output, args.factory, args.batch_size, shard,
                        args.memory_budget, device, args.progress, args.part_size, args.bm25,
                        encoder_runtime=args.runtime, onnx_dir=args.onnx_dir)
            print(f"index: {out}" if out else "shard encoded; the index is built when every shard is done")
        else:
            out = add(args.index, args.corpus, args.checkpoint, args.output, args.batch_size, args.device, args.progress,
                      encoder_runtime=args.runtime, onnx_dir=args.onnx_dir)
            print(f"index: {out}")

    return _run(f"{prog} {args.action}", go, *problems)


def _runtime_args(parser: argparse.ArgumentParser) -> None:
    """--runtime and --onnx-dir of ``dpr index build`` and ``add`` (docs/index.md, docs/export.md)."""
    parser.add_argument("--runtime", choices=("torch", "onnx", "onnx-int8"), default="torch",
                        help="encode passages with torch (default) or ONNX Runtime on the CPU, fp32 or dynamic int8 "
                             "(exported on the fly and cached in $DPR_ONNX_CACHE, default ~/.cache/dpr-service/onnx)")
    parser.add_argument("--onnx-dir", help="with --runtime onnx*: an export of this checkpoint (dpr export --format onnx) "
                        "instead of the cache")


def _export_args(e: argparse.ArgumentParser) -> None:
    """The flags of ``dpr index export``."""
    from dpr_service.core.milvus import INDEX_TYPES

    e.add_argument("--index", required=True, help="artifact directory (verified before anything is written)")
    e.add_argument("--milvus-uri", required=True, help="http://host:19530 for a Milvus server or cluster, or a local "
                   "file such as ./milvus.db for Milvus Lite")
    e.add_argument("--collection", required=True, help="collection to write (created if missing; a collection of "
                   "another checkpoint is refused)")
    e.add_argument("--index-type", default="HNSW", choices=INDEX_TYPES, help="Milvus index, inner product (default HNSW)")
    e.add_argument("--alias", help="point this alias at the collection once complete (servers read the alias)")
    e.add_argument("--token-env", metavar="VAR", help="environment variable holding the Milvus token (user:password "
                   "or API key); never given on the command line")
    e.add_argument("--batch-size", type=_positive_int, default=1000, help="passages per upsert (default 1000)")
    _common_args(e, device=False)


def _export(args) -> None:
    """Run ``dpr index export``: one line on success; a token variable that is unset is an error naming it."""
    from .milvus import export

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if token is None:
            raise ValueError(f"--token-env {args.token_env}: the environment variable is not set")
    written = export(args.index, args.milvus_uri, args.collection, args.index_type, token or None, args.alias,
                     args.batch_size, args.progress)
    print(f"collection: {args.collection} ({written} passages written now)")


def _eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queries", required=True, help="BEIR directory or queries.jsonl, DPR JSONL, or DPR qas .tsv/.csv")
    parser.add_argument("--qrels", help="qrels TSV (default: the BEIR directory's --split)")
    parser.add_argument("--split", default="test", help="qrels split of a BEIR directory (default test)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    conv = parser.add_argument_group("evaluation conventions (docs/evaluation.md; BEIR's figures: "
                                     "--measures beir --judged-queries all --ignore-identical-ids)")
    conv.add_argument("--measures", type=_measures, default="default",
                      help="comma-separated name@k of ndcg, mrr, recall, p, map (e.g. ndcg@10,map@100), 'beir' "
                           "(ndcg/map/recall/p at 1,3,5,10,100,1000) or 'default' (ndcg@10, mrr@10, recall@1,5,20,100)")
    conv.add_argument("--relevance-level", type=_positive_int, default=1,
                      help="lowest grade that counts as relevant for mrr, recall, p and map (trec_eval -l; default 1)")
    conv.add_argument("--judged-queries", choices=("relevant", "all"), default="relevant",
                      help="average over the queries with a relevant passage (default), or over all judged "
                           "queries, those without one scoring 0 (BEIR)")
    conv.add_argument("--ignore-identical-ids", action="store_true",
                      help="drop a retrieved passage whose id is the query's id (BEIR's default; ArguAna, Quora)")
    conv.add_argument("--tie-tolerance", type=_tolerance, default=1e-5,
                      help="scores this close (relative) tie and are ranked by id, descending; 0: only equal "
                           "scores (trec_eval's rule on the scores given; default 1e-5)")


def _measures(text: str) -> tuple[str, ...]:
    from dpr_service.core.metrics import parse_measures

    try:
        return parse_measures(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _tolerance(text: str) -> float:
    value = _finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def _conventions(args: argparse.Namespace):
    from dpr_service.core.metrics import Conventions

    return Conventions(args.measures, args.relevance_level, args.judged_queries, args.ignore_identical_ids,
                       args.tie_tolerance)


def eval_main(argv: list[str], prog: str = "dpr eval") -> int:
    """``dpr eval`` (docs/evaluation.md; ``--mode``/``--fusion``/``--alpha``/``--tune-split``/
    ``--store-alpha``: docs/index.md): prints the metrics and returns 0, or 2 with a one-line error;
    bad arguments exit 2 through argparse."""
    parser = argparse.ArgumentParser(prog=prog, description="Retrieval quality of a checkpoint and its index.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (dpr train's last/ or best/) or a model directory")
    parser.add_argument("--index", required=True, help="the index artifact built with --checkpoint")
    _eval_args(parser)
    _common_args(parser)
    hybrid = parser.add_argument_group("hybrid retrieval (docs/index.md)")
    hybrid.add_argument("--mode", choices=("dense", "bm25", "hybrid", "all"), default="dense",
                        help="rank by the index (dense), by BM25 over the same passages, by both fused, or report all three")
    hybrid.add_argument("--fusion", choices=("rrf", "convex"), default="rrf",
                        help="reciprocal rank fusion (k=60), or alpha * dense + (1 - alpha) * BM25 over min-max normalised scores")
    hybrid.add_argument("--alpha", type=float, help="weight of the dense side for --fusion convex, in [0, 1]")
    hybrid.add_argument("--tune-split", help="choose alpha (convex fusion) by nDCG@10 on this split of --queries "
                                             "(a dev split, or part of train held out from training)")
    hybrid.add_argument("--store-alpha", action="store_true",
                        help="with --tune-split: store the chosen alpha in the index as the fusion POST /search serves by default")
    args = parser.parse_args(argv)
    if args.qrels and (args.mode != "dense" or args.tune_split):
        parser.error("--qrels works with --mode dense only; use a BEIR directory's splits for hybrid evaluation")
    if args.store_alpha and not args.tune_split:
        parser.error("--store-alpha stores the alpha --tune-split chooses: give --tune-split")
    problems = (model_dir_error("--checkpoint", args.checkpoint), input_error("--index", args.index),
                input_error("--queries", args.queries), input_error("--qrels", args.qrels) if args.qrels else None)
    progress = args.progress and not args.json

    def go():
        from .evaluate import evaluate_index, format_metrics

        if args.mode == "dense" and not args.tune_split:
            print(format_metrics(evaluate_index(args.checkpoint, args.index, args.queries, args.qrels, args.split,
                                                device=args.device, progress=progress,
                                                conventions=_conventions(args)), args.json))
            return
        from .hybrid import evaluate_modes

        modes = ("dense", "bm25", "hybrid") if args.mode == "all" else (args.mode,)
        result = evaluate_modes(args.checkpoint, args.index, args.queries, args.split, modes, args.fusion, args.alpha,
                                args.tune_split, args.device, progress, _conventions(args), args.store_alpha)
        if args.json:
            print(format_metrics(result, True))
            return
        if "tuned" in result:
            print(f"alpha {result['tuned']['alpha']:.2f} (chosen on {result['tuned']['split']})"
                  + (f"; stored in {result['tuned']['stored_in']} as the served default" if "stored_in" in result["tuned"] else ""))
        for mode in modes:
            print(f"== {mode}" + (f" ({_fusion_label(result['fusion'])})" if mode == "hybrid" else ""))
            print(format_metrics(result[mode], False))

    return _run(prog, go, *problems)


def _fusion_label(fusion: dict) -> str:
    """``rrf (k=60)`` or ``convex, alpha 0.50``: how a hybrid row was fused."""
    if fusion.get("alpha") is None:
        return f"{fusion['fusion']} (k=60)" if fusion["fusion"] == "rrf" else fusion["fusion"]
    return f"{fusion['fusion']}, alpha {fusion['alpha']:.2f}"


@contextlib.contextmanager
def corpus_named(corpus: str):
    """A BM25Error (a corpus with no word BM25 can index) raised inside, as a DataError naming the corpus file."""
    from dpr_service.core.bm25 import BM25Error
    from dpr_service.core.formats import DataError

    try:
        yield
    except BM25Error as e:
        raise DataError(corpus, None, str(e)) from None


def bm25_main(argv: list[str], prog: str = "dpr bm25") -> int:
    """``dpr bm25``: the BM25 baseline's metrics on judged queries; returns 0, or 2 with a one-line error."""
    parser = argparse.ArgumentParser(prog=prog, description="BM25 baseline (bm25s) on the same queries and judgements.")
    parser.add_argument("--corpus", required=True, help="corpus.jsonl, a BEIR directory or DPR's psgs .tsv")
    _eval_args(parser)
    _common_args(parser, device=False)  # BM25 shows no bars; the flag is accepted as by every other command
    args = parser.parse_args(argv)
    problems = (input_error("--corpus", args.corpus), input_error("--queries", args.queries),
                input_error("--qrels", args.qrels) if args.qrels else None)

    def go():
        from dpr_service.core.formats import read_corpus

        from .evaluate import evaluate_bm25, format_metrics

        with corpus_named(args.corpus):
            print(format_metrics(evaluate_bm25(read_corpus(args.corpus), args.queries, args.qrels, args.split,
                                               _conventions(args)), args.json))

    return _run(prog, go, *problems)


def mine_main(argv: list[str], prog: str = "dpr mine") -> int:
    """``dpr mine`` (docs/index.md): writes plain JSONL with mined negatives; returns 0, or 2 with a
    one-line error."""
    parser = argparse.ArgumentParser(prog=prog, description="Write training data with mined hard negatives (plain JSONL).")
    parser.add_argument("--queries", required=True, help="BEIR directory or queries.jsonl")
    parser.add_argument("--qrels", help="qrels TSV (default: the BEIR directory's --split)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--output", required=True, help="train.jsonl to write")
    parser.add_argument("--method", choices=("bm25", "model"), default="bm25")
    parser.add_argument("--checkpoint", help="for --method model")
    parser.add_argument("--index", help="for --method model: the checkpoint's index")
    parser.add_argument("--num-negatives", type=_positive_int, default=8, help="negatives per line (default 8)")
    parser.add_argument("--depth", type=_positive_int, default=100, help="candidates looked at per question (default 100)")
    parser.add_argument("--skip-top", type=_non_negative_int, default=0, help="ranks skipped at the top (e.g. 3 for model mining)")
    parser.add_argument("--margin", type=_finite_float, default=0.0,
                        help="model mining: skip candidates scoring above (positive score - margin)")
    _common_args(parser)
    args = parser.parse_args(argv)
    problems = (input_error("--queries", args.queries), input_error("--corpus", args.corpus),
                input_error("--qrels", args.qrels) if args.qrels else None,
                model_dir_error("--checkpoint", args.checkpoint) if args.checkpoint else None,
                input_error("--index", args.index) if args.index else None)

    def go():
        from dpr_service.core.formats import read_corpus

        from .mine import mine

        with corpus_named(args.corpus):
            stats = mine(args.queries, read_corpus(args.corpus), args.output, args.qrels, args.split, args.method,
                         args.checkpoint, args.index, args.num_negatives, args.depth, args.skip_top, args.margin, args.device)
        print(f"wrote {stats['examples']} examples to {args.output}; skipped as negatives: "
              f"{stats['skipped_copy_of_positive']} copies of a positive (same title and text), "
              f"{stats['skipped_within_margin']} within the margin; "
              f"{stats['examples_with_fewer_negatives']} examples have fewer than {args.num_negatives} negatives")

    return _run(prog, go, *problems)
