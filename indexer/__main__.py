"""Command line: ``python -m indexer build|update|search|info|eval|dupes|curate|merge|serve``.

Exit codes: 0 done; 1 nothing could be indexed (every file bad) or a search found nothing to
search; 2 bad input (arguments, paths, a locked or foreign collection, a model that breaks
Contract 2), printed as one line without a traceback. Heavy imports (FAISS, ONNX Runtime)
happen after parsing, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from indexer.threads import configure_process

configure_process()  # passive OpenMP waiting, before torch / onnxruntime load (indexer.threads)

from indexer.cli import DEVICES, HelpFormatter, OneLineParser, UsageError, positive_int, similarity  # noqa: E402

if TYPE_CHECKING:  # annotations only: the heavy modules are imported after parsing
    from indexer.collection import Collection
    from indexer.quality import ModelQuality

EXAMPLES = """examples:
  python -m indexer build photos/ --model models/flowers.onnx       # -> indexes/photos
  python -m indexer update indexes/photos
  python -m indexer search indexes/photos query.jpg -k 5 --json
  python -m indexer info indexes/photos
  python -m indexer eval indexes/photos
  python -m indexer dupes indexes/photos --threshold 0.97
  python -m indexer curate indexes/photos --json
  python -m indexer build photos/ --shard 0/4 --out parts/p0   # on each of 4 machines, then:
  python -m indexer merge parts/p0 parts/p1 parts/p2 parts/p3 --out indexes/photos
  python -m indexer serve indexes/photos                          # HTTP API on 127.0.0.1:8000

exit codes: 0 done; 1 no image could be indexed; 2 bad input
"""


def _writer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="ONNX model from 'python -m exports' (default for build: the newest "
                   "models/*.onnx trained on IMAGE_DIR or a folder above it, else an error listing the "
                   "candidates; for update: the collection's own model)")
    p.add_argument("--index", default="auto", help="auto (exact up to 20k items at D=512, then IVF tuned to "
                   "recall@10 >= 0.95), flat, hnsw, ivf, or a FAISS factory string such as 'IVF1024,SQ8'")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where ONNX Runtime and FAISS run (default auto: GPU when usable)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per model call (default 64)")
    p.add_argument("--workers", type=positive_int, default=None, help="decoding threads (default: one per core)")
    p.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime threads (default: one per "
                   "physical core)")
    p.add_argument("--max-pixels", type=positive_int, default=None, help="refuse images with more pixels than "
                   "this (decompression-bomb guard; default 100,000,000)")
    p.add_argument("--rebuild", action="store_true", help="re-embed everything (needed after changing the model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m indexer",
        description="Embed image folders with an exported ONNX model, index them with FAISS, search them.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")

    p = sub.add_parser("build", help="embed and index an image folder (incremental when the collection exists)",
                       description="Embed every image under IMAGE_DIR (recursively; label = first sub-folder) "
                       "and write a collection. Bad files are recorded and skipped. Without --model the model "
                       "trained on IMAGE_DIR is used (the newest such models/*.onnx); the model used and what "
                       "it was trained on are printed first.",
                       epilog="example:\n  python -m indexer build photos/ --model models/photos.onnx --out "
                       "indexes/photos", formatter_class=HelpFormatter)
    p.add_argument("image_dir", type=Path, help="folder of images")
    p.add_argument("--out", type=Path, help="collection folder (default indexes/<folder name>)")
    p.add_argument("--shard", help="embed only shard i of n (e.g. 0/4), or 'env' for RANK/WORLD_SIZE (torchrun) "
                   "or SLURM_PROCID/SLURM_NTASKS; join the parts with 'merge'")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "int8"),
                   help="model variant (default auto: the model's verified int8 sibling NAME-int8.onnx from "
                   "'python -m exports --with-int8' on a CPU with VNNI/AMX, else fp32; a --model file is used "
                   "as it is unless fp32 or int8 is asked for)")
    _writer_options(p)

    p = sub.add_parser("update", help="embed new or changed files, drop deleted ones",
                       description="Bring a collection up to date with its image folder: new and changed "
                       "files are embedded (size+mtime, then content hash), deleted ones removed. The "
                       "collection's own model is used unless --model (with --rebuild) replaces it.",
                       epilog="example:\n  python -m indexer update indexes/photos",
                       formatter_class=HelpFormatter)
    p.add_argument("collection", type=Path)
    _writer_options(p)

    p = sub.add_parser("search", help="the most similar images to a query image",
                       description="Embed a query image with the collection's model and print the K most "
                       "similar indexed images, best first, with their cosine similarity and its closeness: the "
                       "share of the collection's items whose nearest neighbour is less similar (so 97% is a "
                       "closer match than almost any two images here, whatever the model's scale).",
                       epilog="example:\n  python -m indexer search indexes/photos query.jpg -k 5 --json",
                       formatter_class=HelpFormatter)
    p.add_argument("collection", type=Path)
    p.add_argument("query", type=Path, help="query image file")
    p.add_argument("-k", type=positive_int, default=10, help="number of results (default 10)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {id, path, score, label, closeness}, "
                   "best first")
    p.add_argument("--device", default="auto", choices=DEVICES)

    p = sub.add_parser("info", help="what a collection holds: counts, model, index recipe, measured recall",
                       description="Describe a collection: its image folder, item and skipped counts, the "
                       "model and what it was trained on, the index recipe with its measured recall, the map.",
                       epilog="example:\n  python -m indexer info indexes/photos --json",
                       formatter_class=HelpFormatter)
    p.add_argument("collection", type=Path)
    p.add_argument("--json", action="store_true", help="print the manifest as JSON, with the model's recorded "
                   "training quality under 'quality'")

    p = sub.add_parser("eval", help="kNN, linear and few-label accuracy from the folder labels",
                       description="Measure how well the embeddings separate the labels (first-level "
                       "sub-folders): weighted kNN, a linear classifier and 1% / 10% few-label accuracy on a "
                       "fixed train/test split of the labelled items.",
                       epilog="example:\n  python -m indexer eval indexes/photos",
                       formatter_class=HelpFormatter)
    p.add_argument("collection", type=Path)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("dupes", help="groups of near-duplicate images",
                       description="Print groups of near-duplicate images, one group a line; the threshold "
                       "used and why, and a summary, go to stderr. The default threshold adapts to the model: "
                       "a near-duplicate is ten times closer than the collection's typical nearest neighbour "
                       "(never below cosine 0.95), groups stay within twice the threshold's distance of their "
                       "centre (no chains across a collection), and identical files always group.",
                       epilog="example:\n  python -m indexer dupes indexes/photos --threshold 0.97",
                       formatter_class=HelpFormatter)
    p.add_argument("collection", type=Path)
    p.add_argument("--threshold", type=similarity, default=None, help="cosine similarity above which two "
                   "images are duplicates (default: adapted to the model, see above)")
    p.add_argument("--json", action="store_true", help="print a JSON list of groups of {id, path}")

    p = sub.add_parser("curate", help="label mistakes, duplicates, outliers and representative images",
                       description="Score every item from the collection's own embeddings (one nearest-"
                       "neighbour search of all items through its index) and keep the scores in the collection "
                       "for this generation: likely label mistakes (cleanlab's confident learning on the "
                       "neighbours' out-of-sample votes), near-duplicate groups (exact copies marked), outliers "
                       "(distance to the 10th neighbour) and the most representative images of each k-means "
                       "cluster. Prints a summary, or with --json one object with the four lists.",
                       epilog="example:\n  python -m indexer curate indexes/photos --labels folder --json",
                       formatter_class=HelpFormatter)
    p.add_argument("collection", type=Path)
    p.add_argument("--labels", choices=("auto", "folder", "user"), default="auto",
                   help="which labels to check: the first-level folder names, or the labels people set in the "
                   "app (default auto: the folder labels when there are any)")
    p.add_argument("--top", type=positive_int, default=100, help="outliers listed (default 100)")
    p.add_argument("--json", action="store_true", help="print one JSON object: label_issues, duplicate_groups, "
                   "outliers, representative")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("merge", help="join part collections from 'build --shard' into one",
                       description="Join the part collections written by 'build --shard i/n' (same image "
                       "folder, same model) into one collection with one index and one map.",
                       epilog="example:\n  python -m indexer merge parts/p0 parts/p1 --out indexes/photos",
                       formatter_class=HelpFormatter)
    p.add_argument("parts", type=Path, nargs="+", metavar="PART")
    p.add_argument("--out", type=Path, required=True, help="the merged collection")
    p.add_argument("--index", default="auto", help="index recipe, as for build")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--no-progress", action="store_true")

    from indexer.server.options import add_parser as add_serve_parser

    add_serve_parser(sub)
    return parser


def _options(args: argparse.Namespace) -> dict[str, Any]:
    from indexer.images import DEFAULT_MAX_PIXELS

    return {"index": args.index, "device": args.device, "batch_size": args.batch_size, "workers": args.workers,
            "threads": args.threads, "max_pixels": args.max_pixels or DEFAULT_MAX_PIXELS,
            "progress": not args.no_progress}


def _print_summary(col: Collection, directory: Path) -> None:
    print(f"collection  {directory}")
    for line in col.summary.lines() if col.summary is not None else ():
        print(line)
    _print_quality(col.quality)


def _print_quality(measured: ModelQuality) -> None:
    """The model's recorded training quality, and a warning when it is no better than its start."""
    print(f"quality     {measured.summary()}")
    if measured.doubtful:
        print(f"warning: {measured.doubt()}, by its trainer's kNN monitor; searches and few-label results on "
              "this collection are an untrained network's", file=sys.stderr)


def _announce_model(image_dir: Path | None, out: Path, given: Path | None, precision: str = "auto",
                    device: str = "auto") -> Path | None:
    """Choose the model as the writer will (the given one, the collection's own, or the one
    trained on the folder: :func:`indexer.models.choose_model`, then its variant:
    :func:`indexer.models.choose_variant`) and print it with what it was trained on and why this
    variant, before any work, so a model is never used without a word."""
    from indexer import models, store

    manifest = out / store.MANIFEST
    variant = None
    if given is not None:
        variant = models.choose_variant(given, precision=precision, device=device, given=True)
        path, how = variant.path, "given with --model"
    elif manifest.is_file():
        try:
            path, how = out / store.read_manifest(out)["model_file"], "the collection's own model"
        except (store.CollectionError, KeyError, OSError):
            return None  # the writer says what is wrong with the collection
    else:
        if image_dir is None:
            return None
        if not image_dir.is_dir():  # say so, not "no model was trained on" a folder that is not there
            raise UsageError(f"image folder not found: {image_dir}")
        variant = models.choose_variant(models.choose_model(image_dir).path, precision=precision, device=device)
        path, how = variant.path, "trained on this folder"
    info = models.model_info(path)
    note = how
    if image_dir is not None and info.train_root is not None and not models.trained_on(info, image_dir):
        note += f"; NOT trained on {image_dir}"
    print(f"model       {info.describe()}, {note}", flush=True)
    if variant is not None:
        print(f"precision   {variant.precision}: {variant.reason}", flush=True)
    return variant.path if variant is not None else None


def run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from indexer.server.launch import serve

        return serve(args)
    from indexer import ann, build, merge, models
    from indexer.collection import Collection

    if args.command in ("build", "update"):
        try:
            ann.choose_recipe(100, 8, args.index)  # a bad --index fails now, not after embedding
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.command == "build":
        try:
            shard = build.parse_shard(args.shard)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        out = args.out
        if out is None:
            name = args.image_dir.expanduser().resolve().name
            out = Path("indexes") / (f"{name}.part-{shard[0]}-of-{shard[1]}" if shard else name)
        model = _announce_model(args.image_dir, out, args.model, args.precision, args.device)
        col = build.build(args.image_dir, out, model=model, rebuild=args.rebuild, shard=shard,
                          **_options(args))
        _print_summary(col, out)
        _refresh_curation(col, progress=not args.no_progress)
        return 0
    if args.command == "update":
        _announce_model(None, args.collection, args.model)
        new = build.update(args.collection, model=args.model, rebuild=args.rebuild, **_options(args))
        _print_summary(new, args.collection)
        _refresh_curation(new, progress=not args.no_progress)
        return 0
    if args.command == "merge":
        col = merge.merge(args.parts, args.out, index=args.index, device=args.device,
                          progress=not args.no_progress)
        _print_summary(col, args.out)
        return 0

    col = Collection.open(args.collection, device=getattr(args, "device", "auto"))
    if args.command == "search":
        from indexer.images import ImageDecodeError

        try:
            hits = col.search_image(args.query, args.k)
        except ImageDecodeError as exc:
            raise UsageError(f"cannot read the query image: {exc}") from None
        if args.json:
            print(json.dumps([h.to_json() for h in hits], indent=2))
        else:
            stats = col.neighbour_stats()
            if stats is not None:
                print("rank  cosine  closeness (share of items whose nearest neighbour is less similar)  path",
                      file=sys.stderr)
            for rank, h in enumerate(hits, 1):
                where = f"{h.closeness:4.0%}  " if h.closeness is not None else ""
                words = f"  ({stats.describe(h.score)})" if stats is not None else ""
                print(f"{rank:3d}  {h.score:.4f}  {where}{h.path}" + (f"  [{h.label}]" if h.label else "") + words)
        return 0
    if args.command == "info":
        m = col.manifest
        if args.json:
            print(json.dumps({**m, "quality": col.quality.as_dict()}, indent=2, sort_keys=True))
            return 0
        counts = m["counts"]
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted((counts.get("skipped_by_reason") or {}).items())) or "none"
        props = m["model"]["props"]
        lines = [
            f"collection  {col.directory} (format {m['format_version']}, generation {m['generation']})",
            f"images      {m['image_root']}" + (f" (shard {m['shard'][0]}/{m['shard'][1]})" if m.get("shard") else ""),
            f"items       {counts['indexed']:,} indexed, {counts['skipped']:,} skipped ({reasons})",
            f"model       {props.get('moco.arch', '?')} {props.get('moco.preset', '')}, "
            f"{props.get('moco.image_size', '?')} px, "
            f"D={m['dim']}, sha256 {m['model']['sha256'][:12]}",
            f"precision   {models.describe_precision(props)}",
            "index       " + ann.describe_recipe(m["index"]["recipe"]),
            f"vectors     {sum(p['count'] for p in m['vectors']):,} rows in {len(m['vectors'])} file(s)",
            f"map         {m['projection']['fit_points']:,} points fitted by t-SNE, the rest placed"
            if m.get("projection") else "map         none",
            f"updated     {m['updated']} (created {m['created']})",
        ]
        print("\n".join(lines))
        _print_quality(col.quality)
        if col.quality.monitor:
            print(f"monitor     {col.quality.monitor}")
        return 0
    if args.command == "eval":
        result = col.evaluate()
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{result['classes']} classes, {result['train']} train / {result['test']} test items")
            for key in ("knn_top1", "linear_top1", "few_label_1pct", "few_label_10pct"):
                print(f"{key:16s} {100 * result[key]:6.2f} %  (std {100 * result[key + '_std']:.2f})")
        return 0
    if args.command == "dupes":
        t0 = time.perf_counter()
        chosen = col.duplicate_threshold(args.threshold)
        print(f"threshold {chosen.reason}", file=sys.stderr)
        groups = col.duplicates(chosen.similarity)
        paths = {it.id: it.path for it in col.items}
        if args.json:
            print(json.dumps([[{"id": i, "path": paths.get(i)} for i in g] for g in groups], indent=2))
        else:
            for g in groups:
                print("  ".join(paths.get(i, str(i)) for i in g))
            print(f"{len(groups)} groups, {sum(map(len, groups))} images, the largest "
                  f"{max(map(len, groups), default=0)} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        return 0
    if args.command == "curate":
        return _curate(col, args)
    raise UsageError(f"unknown command {args.command}")


def _refresh_curation(col: Collection, *, progress: bool) -> None:
    """Curation scores describe one generation: when the collection kept some, compute them again
    for the new one (with the same labels), so they never describe files that changed."""
    from indexer import curation_store
    from indexer.curate import curate

    source = curation_store.kept_label_source(col.directory)
    if source is None or curation_store.load(col.directory, col.generation, col.ids) is not None:
        return
    scores = curate(col, labels=source, show_progress=progress)
    print(f"curation    scores recomputed for generation {scores.generation} ({len(scores.label_issues)} label "
          f"issues, {len(scores.duplicate_groups)} duplicate groups)")


def _curate(col: Collection, args: argparse.Namespace) -> int:
    from indexer.curate import curate, report

    t0 = time.perf_counter()
    scores = curate(col, labels=args.labels, show_progress=not args.no_progress)
    result = report(col, scores, top=args.top)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"curated {len(col):,} items of generation {scores.generation} in {time.perf_counter() - t0:.1f} s "
          f"({scores.label_source} labels); kept in the collection")
    if scores.note:
        print(f"label issues: none searched: {scores.note}")
    else:
        print(f"label issues: {len(result['label_issues'])} likely mistakes")
    for issue in result["label_issues"][:10]:
        print(f"  {issue['path']}  labelled {issue['label']}, looks like {issue['suggested']} "
              f"({issue['confidence']:.0%})")
    groups = result["duplicate_groups"]
    exact = sum(1 for g in groups if any(member["exact"] for member in g))
    print(f"duplicate groups: {len(groups)} ({exact} with exact copies), {sum(map(len, groups))} images")
    print("outliers, most unusual first: " + ", ".join(o["path"] for o in result["outliers"][:5]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import warnings

    from PIL import Image

    # The indexer refuses oversized images itself (--max-pixels) and records them; Pillow's own
    # warning for each such file would only clutter the progress bar.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    prog = f"python -m indexer {args.command}"
    from indexer.build import NothingIndexed
    from indexer.embed import ModelError
    from indexer.store import CollectionError, one_line

    try:
        return run(args)
    except NothingIndexed as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except (UsageError, CollectionError, ModelError, KeyError) as exc:
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{prog}: error: {one_line(text)}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.DatabaseError) as exc:
        # The storage itself failed (permissions, a full disk, a file vanished or was damaged
        # where no check names it): still one line, with the file when the OS gave it.
        where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        print(f"{prog}: error: {where}{one_line(detail)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the collection is unchanged", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
