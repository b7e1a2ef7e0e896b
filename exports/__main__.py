"""Command line: `python -m exports CHECKPOINT -o OUT.onnx [...]` and `python -m exports info MODEL.onnx`.

Exit codes: 0 done; 1 the model was built but failed verification (nothing written; with
--with-int8, a verified fp32 model is written and only its int8 sibling refused); 2 bad
input (checkpoint, paths, options), printed as one line without a traceback. Heavy imports
(torch, onnxruntime) happen after parsing, so --help answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from indexer.threads import configure_process

configure_process()  # passive OpenMP waiting, before torch / onnxruntime load (indexer.threads)

from indexer.cli import DEVICES, HelpFormatter, OneLineParser, fraction, positive_int  # noqa: E402

EXAMPLES = """examples:
  python -m exports runs/flowers/checkpoint.pt -o models/flowers.onnx
  python -m exports runs/flowers -o models/flowers.onnx --with-int8   # + models/flowers-int8.onnx
  python -m exports runs/flowers -o models/flowers-int8.onnx --int8 --calibration photos/
  python -m exports runs/flowers -o models/flowers-fp16.onnx --fp16 --calibration photos/
  python -m exports info models/flowers.onnx

exit codes: 0 written; 1 verification failed, nothing written (--with-int8: the fp32 model
only); 2 bad input
"""


def build_export_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m exports",
        description="Export a MoCo checkpoint as a self-describing ONNX embedding model: uint8 RGB\n"
        "images [N,S,S,3] in, L2-normalized float32 embeddings [N,D] out, checked against PyTorch\n"
        "before anything is written.\n\n"
        "Sub-command: 'python -m exports info MODEL.onnx' prints what a model says about itself.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint.pt or the run folder holding it")
    parser.add_argument("-o", "--output", required=True, help="model file to write, e.g. models/NAME.onnx "
                        "(missing folders are created)")
    parser.add_argument("--head", action="store_true", help="embed with the projection head's output "
                        "instead of the backbone's pooled features")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="half-precision model (for GPUs; half "
                           "the file size)")
    precision.add_argument("--int8", action="store_true", help="int8 model only, calibrated on --calibration")
    precision.add_argument("--with-int8", action="store_true", help="write the fp32 model and, beside it, "
                           "its verified int8 sibling NAME-int8.onnx, which 'python -m indexer build' uses "
                           "on CPUs with VNNI/AMX (about 2x faster indexing)")
    parser.add_argument("--calibration", type=Path, metavar="IMAGE_DIR", help="images like the ones you "
                        "will index: int8 calibration, and the fp16/int8 neighbour check (default for "
                        "int8: the training folder recorded in the checkpoint)")
    parser.add_argument("--verify-images", type=Path, metavar="DIR", help="real images for the fp32 "
                        "parity check (default: --calibration, else generated images)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="ONNX Runtime device for the checks (default auto: CUDA where usable)")
    parser.add_argument("--no-verify", action="store_true", help="write the model even if a check fails")
    parser.add_argument("--min-overlap", type=fraction, default=None, help="top-10 neighbour overlap "
                        "with fp32 that fp16/int8 must reach (default 0.95 for fp16, 0.85 for int8)")
    parser.add_argument("--calibration-count", type=positive_int, default=256, help="images used to "
                        "calibrate int8 (default 256)")
    parser.add_argument("--check-images", type=positive_int, default=512, help="images of the neighbour "
                        "check (default 512)")
    return parser


def build_info_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m exports info", description="Print a model's metadata (what it was "
                           "trained on included), input and output signature, file size, and the ONNX Runtime "
                           "providers usable here.", epilog="example:\n  python -m exports info models/flowers.onnx",
                           formatter_class=HelpFormatter)
    parser.add_argument("model", help="an .onnx file written by python -m exports")
    return parser


def run_info(argv: list[str]) -> int:
    args = build_info_parser().parse_args(argv)
    from exports.info import InfoError, format_info, read_model_info
    from indexer import runtime

    try:
        info = read_model_info(args.model)
    except InfoError as err:
        print(f"python -m exports info: error: {err}", file=sys.stderr)
        return 2
    print(format_info(info, runtime.describe_providers()))
    return 0


def run_export(argv: list[str]) -> int:
    args = build_export_parser().parse_args(argv)
    from exports.onnx import DEFAULT_OPSET, ExportError, ExportOptions, VerificationFailed, export_checkpoint

    options = ExportOptions(
        checkpoint=Path(args.checkpoint), output=Path(args.output), head=args.head,
        precision="fp16" if args.fp16 else "int8" if args.int8 else "fp32",
        calibration=args.calibration, verify_images=args.verify_images,
        opset=args.opset if args.opset is not None else DEFAULT_OPSET, device=args.device,
        verify=not args.no_verify, min_overlap=args.min_overlap,
        calibration_count=args.calibration_count, check_count=args.check_images, with_int8=args.with_int8)
    made = _make_output_folder(options.output)
    if isinstance(made, str):
        print(f"python -m exports: error: {made}", file=sys.stderr)
        return 2
    done = False
    try:
        export_checkpoint(options)
        done = True
    except ExportError as err:
        print(f"python -m exports: error: {err}", file=sys.stderr)
        return 2
    except VerificationFailed as err:
        print(f"python -m exports: error: {err}", file=sys.stderr)
        return 1
    finally:
        if not done and made is not None:
            _remove_if_empty(made)
    return 0


def _make_output_folder(output: Path) -> Path | None | str:
    """Create the output's missing folders (``-o models/x.onnx`` on a fresh clone), as a download
    tool would; returns the top folder created (removed again if the export fails), None when
    nothing was missing, or the one-line reason it could not be created."""
    parent = output.parent
    missing = [p for p in (parent, *parent.parents) if not p.exists()]
    if not missing:
        return None
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create the output folder {parent}: {err.strerror or err}"
    return missing[-1]


def _remove_if_empty(top: Path) -> None:
    """Undo :func:`_make_output_folder` after a failed export: nothing written, nothing left."""
    for folder in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]:
        try:
            folder.rmdir()
        except OSError:
            return


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "info":
            return run_info(argv[1:])
        return run_export(argv)
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
