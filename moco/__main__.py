"""Command line: `python -m moco train|eval|demo-data`.

Usage errors print one line and exit with code 2; nothing a user can type ends in a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from indexer.threads import configure_process

configure_process()  # passive OpenMP waiting, before torch loads (indexer.threads)

from indexer.cli import HelpFormatter, OneLineParser, UsageError, from_parser  # noqa: E402
from moco.config import ARCHS, PRESETS, ConfigError, TrainConfig, build_config, fit_to_data, validate  # noqa: E402
from moco.pacer import format_duration, parse_duration, process_age  # noqa: E402

EXAMPLES = """examples:
  python -m moco train photos/ --out runs/photos --epochs 100 --val photos_val/
  python -m moco train photos/ --out runs/photos --time-budget 30m --val photos_val/
  python -m moco train --resume runs/photos --epochs 200
  python -m moco eval runs/photos/checkpoint.pt --train photos/ --val photos_val/ --json
  python -m moco demo-data data/digits
"""


# Hyper-parameters exposed as flags: (field, help). Types and defaults come from TrainConfig and
# the preset; a flag left unset keeps the preset's value.
HYPER_PARAMETERS = (
    ("stem", "ResNet stem: imagenet, small (3x3 conv, no max-pool; for inputs of 64 px and less), small_pool "
             "(3x3 conv and the max-pool: a quarter of small's arithmetic) or auto "
             "(small at 32 px and less; the ImageNet stem in a CPU time budget at 32 px that runs in fp32, where "
             "the small stem leaves too few steps)"),
    ("optimizer", "sgd, lars or adamw"),
    ("base_lr", "learning rate per 256 images (lr = base_lr x batch / 256)"),
    ("lr", "absolute learning rate (overrides --base-lr)"),
    ("sgd_momentum", "optimizer momentum"),
    ("weight_decay", "weight decay"),
    ("lr_schedule", "cosine or step"),
    ("warmup_epochs", "linear warm-up length in epochs"),
    ("head", "projection head: linear (v1), mlp (v2), mlp_bn (v2 with batch norm) or v3 (projector + predictor)"),
    ("dim", "output dimension of the head"),
    ("mlp_dim", "hidden width of the head (default: backbone width for v2, 4096 for v3)"),
    ("queue_size", "number of negative keys K (capped below the number of images)"),
    ("queue_start", "random (the paper: the queue starts as K random vectors) or empty (only keys already "
                    "enqueued are negatives)"),
    ("batch_negatives", "use the other keys of the batch as negatives too"),
    ("moco_m", "key encoder momentum m"),
    ("moco_m_cos", "raise the momentum toward 1 on a cosine schedule"),
    ("temperature", "InfoNCE temperature T"),
    ("symmetric", "symmetric loss over both views"),
    ("bn_splits", "split-BN sub-batches on one device (1 = plain BN)"),
    ("stop_grad_conv1", "freeze the ViT patch projection (MoCo v3 trick)"),
    ("augment", "augmentation recipe: v1, v2 or v3"),
    ("crop_min_scale", "smallest random-resized-crop area"),
    ("blur_relative", "scale the Gaussian blur's sigma (0.1-2 px, chosen for 224 px) with the training size"),
    ("augment_on", "device (batched tensor ops on the training device, the default) or workers (per image "
                   "in loader workers, torchvision's pipeline)"),
    ("multi_crop", "N small crops per image besides the two global views, through the query encoder only, "
                   "their positives the global views' keys (SwAV / solo-learn MoCo V2+); 0 (default) off"),
    ("small_crop_size", "the small crops' size in px (default 0.45 x --image-size, a multiple of 8)"),
    ("progressive", "progressive resolution: start at this fraction of --image-size (e.g. 0.5) and rise "
                    "linearly to it by 75%% of the planned steps; 0 (default) off"),
    ("cache", "decode each image once into a memory-mapped cache reused across epochs and runs"),
    ("cache_dir", "where the decoded-image cache lives (default ~/.cache/moco/decoded or $MOCO_CACHE_DIR)"),
    ("cache_max_gb", "largest decoded-image cache to build; beyond it training streams from the files"),
    ("seed", "random seed"),
    ("deterministic", "deterministic algorithms (exactly repeatable on CPU)"),
    ("workers", "data loader worker processes"),
    ("checkpoint_every", "minutes between checkpoints within an epoch"),
    ("eval_every", "epochs between kNN monitor evaluations (with --val; --epochs runs)"),
    ("monitor_evals", "kNN monitor evaluations spread evenly over a --time-budget run, after the one at "
                      "the start (fewer if they would take over 10%% of the budget)"),
    ("knn_max_images", "kNN monitor: at most this many bank (training) and query (val) images each, a fixed "
                       "random subset, so it is cheap enough to run often; 0 uses all (moco eval always does)"),
    ("knn_k", "neighbours for the kNN monitor"),
    ("knn_t", "temperature of the weighted kNN vote"),
    ("log_every", "steps between metrics.jsonl records"),
    ("channels_last", "channels-last memory format (faster convolutions)"),
    ("compile", "torch.compile the training step (minutes to start; for long GPU runs)"),
)


def _add_hyper_parameters(parser: argparse.ArgumentParser) -> None:
    types = {f.name: f.type for f in fields(TrainConfig)}
    group = parser.add_argument_group("hyper-parameters (default: the preset's value)")
    for name, help_text in HYPER_PARAMETERS:
        flag = "--" + name.replace("_", "-")
        kind = types[name]
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind in ("int", "int | None"):
            group.add_argument(flag, type=int, default=None, help=help_text)
        elif kind in ("float", "float | None"):
            group.add_argument(flag, type=float, default=None, help=help_text)
        else:
            group.add_argument(flag, default=None, help=help_text)
    group.add_argument("--small-crop-scale", type=_scale_range, default=None, metavar="LO,HI",
                       help="area range of the small crops (default 0.05,0.3)")
    group.add_argument("--mean", type=_floats, default=None, help="normalisation mean, e.g. 0.485,0.456,0.406")
    group.add_argument("--std", type=_floats, default=None, help="normalisation std, e.g. 0.229,0.224,0.225")


def _numbers(text: str, count: int, what: str) -> tuple[float, ...]:
    """Exactly `count` comma-separated numbers, else ValueError naming `what` was expected."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise ValueError(f"expected {what}, got {text!r}")
    return values


@from_parser
def _floats(text: str) -> tuple[float, ...]:
    """--mean/--std: three comma-separated numbers, one per RGB channel."""
    return _numbers(text, 3, "three comma-separated numbers")


@from_parser
def _scale_range(text: str) -> tuple[float, ...]:
    """--small-crop-scale: two comma-separated numbers, LO,HI."""
    return _numbers(text, 2, "LO,HI (two comma-separated numbers)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m moco", description="MoCo self-supervised training of image "
                           "embeddings (v1, v2, v3).", epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = commands.add_parser("train", help="train on a folder of images (labels not needed)",
                                description="Train a MoCo model on any folder tree of images. Sub-folder "
                                "names are used only as labels for monitoring. The run folder gets "
                                "checkpoint.pt (resumable), metrics.jsonl and, with --val, monitor.png.",
                                epilog="examples:\n"
                                "  python -m moco train photos/ --out runs/photos --time-budget 30m --val val/\n"
                                "  python -m moco train photos/ --out runs/photos --epochs 100 --preset v3\n"
                                "  python -m moco train --resume runs/photos --epochs 200",
                                formatter_class=HelpFormatter)
    train.add_argument("data_dir", nargs="?", help="folder of images (jpg, png, webp, bmp, tif, gif)")
    train.add_argument("--out", help="run folder (default: runs/<folder name>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly")
    train.add_argument("--preset", default=None, help=f"recipe: {', '.join(PRESETS)} (default v2)")
    train.add_argument("--arch", default=None, help=f"backbone: {', '.join(ARCHS)} (default resnet18)")
    train.add_argument("--image-size", type=int, default=None, help="training resolution (default 64)")
    train.add_argument("--batch-size", type=int, default=None, help="images per step (default 256, "
                       "lowered to fit a small folder)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="epochs (default 100; with --resume, "
                        "a larger value extends the run)")
    length.add_argument("--time-budget", type=from_parser(parse_duration), default=None, metavar="DURATION",
                        help="train for this much wall time instead, e.g. 90s, 30m, 2h, 1h30m: the speed is "
                        "timed over a few steps and the steps planned to end (final checkpoint written) "
                        "within it, start-up and kNN evaluations included")
    train.add_argument("--paper-defaults", action="store_true", default=None, help="use the preset's published "
                       "values as they are: no adjustment of momentum, queue and warm-up to the run's length")
    train.add_argument("--val", help="labeled folder for the kNN monitor")
    train.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    train.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                       help="arithmetic of the encoders: bf16 autocast or fp32; auto (the default) picks bf16 on "
                       "a GPU with native bf16; on a CPU with AMX or AVX-512-BF16 it times the run's step in both "
                       "(a few seconds) and keeps bf16 only if it is at least 1.15x faster (ResNet-18: at 64 px and "
                       "with the small stem at 32 px it is, with --stem imagenet at 32 px not); fp32 elsewhere "
                       "(with --resume: the run's own, unless given)")
    _add_hyper_parameters(train)

    evaluate = commands.add_parser("eval", help="kNN, linear-probe and few-label accuracy of a checkpoint",
                                   description="Evaluate a checkpoint's frozen backbone features with folder "
                                   "labels: weighted kNN, a linear probe and few-label accuracy, learned on "
                                   "--train and scored on --val (all images, unlike the training monitor).",
                                   epilog="example:\n  python -m moco eval runs/photos --train photos/ --val val/"
                                   " --json", formatter_class=HelpFormatter)
    evaluate.add_argument("checkpoint", help="checkpoint.pt or its run folder")
    evaluate.add_argument("--train", required=True, help="labeled folder the classifiers learn from")
    evaluate.add_argument("--val", required=True, help="labeled folder they are scored on")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    evaluate.add_argument("--random-init", action="store_true", help="evaluate a randomly initialised "
                          "backbone of the checkpoint's architecture instead (the baseline; its batch-norm "
                          "statistics are measured on --train images so it is not crippled)")
    evaluate.add_argument("--seeds", type=int, default=3, help="seeds for the few-label figures (default 3)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda")
    evaluate.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                          help="arithmetic of feature extraction (default auto: bf16 on a GPU with native bf16; "
                          "on a CPU with AMX or AVX-512-BF16 the backbone's forward is timed in both and bf16 kept "
                          "only if at least 1.15x faster; fp32 elsewhere)")
    evaluate.add_argument("--workers", type=int, default=1, help="data loader workers")

    demo = commands.add_parser("demo-data", help="write the built-in demo set (scikit-learn digits)",
                               description="Write scikit-learn's 1,797 bundled handwritten digits as 32 px "
                               "PNG files in one folder per class.",
                               epilog="example:\n  python -m moco demo-data data/digits && "
                               "python -m moco train data/digits --time-budget 3m", formatter_class=HelpFormatter)
    demo.add_argument("out_dir", help="folder to write into")
    return parser


def _given_hyper_parameters(args: argparse.Namespace) -> dict[str, Any]:
    names = [f.name for f in fields(TrainConfig)]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def run_train(args: argparse.Namespace, started: float | None = None) -> int:
    from moco import distributed
    from moco.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
    from moco.data import DataError, open_folder
    from moco.defaults import fit_crops, fit_recipe, fit_to_plan
    from moco.runlog import TrainingDiverged, TrainingStopped
    from moco.train import Trainer

    world = distributed.world_from_env()
    say = print if world.is_main else (lambda *a, **k: None)  # torchrun: rank 0 speaks for all
    state = None
    if args.resume:
        try:
            state = load_checkpoint(args.resume)
        except CheckpointError as err:
            raise UsageError(str(err)) from None
        run_dir = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        config = TrainConfig.from_dict(state["config"])
        if args.time_budget is not None:
            raise UsageError("--resume keeps to the run's stored plan; --time-budget cannot be given with it")
        changed = {k: v for k, v in _given_hyper_parameters(args).items()
                   if k not in ("epochs", "workers", "precision")}
        if changed or args.data_dir:
            raise UsageError("--resume continues a run as it was; only --epochs, --workers, --precision and "
                             f"--device may be given (got {', '.join(changed) or 'DATA_DIR'})")
        if args.precision is not None and args.precision != config.precision:
            # Weights, queue and optimizer state are float32 in either precision: switching is safe.
            config.notes.append(f"precision {config.precision} -> {args.precision} on resume")
            say(f"note: {config.notes[-1]}")
            config.precision, config.precision_reason = args.precision, ""
        data_dir, val_dir = state["data"]["root"], state["data"].get("val")
        done = state["progress"]["epoch"]
        if args.workers is not None:
            config.workers = args.workers
        plan = state.get("plan") or {}
        if plan.get("mode") == "budget":
            total, step = plan.get("total_steps"), state["progress"]["step"]
            budget = format_duration(plan["budget_s"])
            if args.epochs is not None:
                raise UsageError(f"the run in {run_dir} was planned for a {budget} time budget; --epochs cannot "
                                 "change it (start a new run to train longer)")
            if total is not None and step >= total:
                say(f"nothing to do: the run in {run_dir} has completed its {total} planned steps "
                    f"({budget} budget)")
                return 0
            say(f"resuming at step {step} of the {total} planned steps ({budget} budget; the plan is kept)"
                if total is not None else f"resuming a {budget} run that had not finished timing its steps")
        elif args.epochs is not None and args.epochs != config.epochs:
            if args.epochs <= done:
                raise UsageError(f"the run has completed {done} epochs; --epochs must be larger to extend it")
            say(f"re-planning the LR and momentum schedules over {args.epochs} epochs (was {config.epochs})")
            config.epochs = args.epochs
        if plan.get("mode") != "budget" and done >= config.epochs:
            say(f"nothing to do: the run in {run_dir} has completed {done}/{config.epochs} epochs "
                "(pass a larger --epochs to extend it)")
            return 0
    else:
        if not args.data_dir:
            raise UsageError("give a DATA_DIR to train on, or --resume RUN_DIR")
        data_dir, val_dir = args.data_dir, args.val
        run_dir = Path(args.out) if args.out else Path("runs") / Path(args.data_dir).resolve().name
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(f"--out {run_dir} exists and is not a folder")
        if (run_dir / CHECKPOINT_NAME).exists() and world.is_main:
            raise UsageError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, or pick "
                             "another --out")
        try:
            config = build_config(_given_hyper_parameters(args))
        except ConfigError as err:
            raise UsageError(str(err)) from None
        if config.time_budget is not None:
            config.epochs = 0  # follows from the plan, once the steps are timed
            if args.eval_every is not None:
                raise UsageError("--eval-every counts epochs; a --time-budget run spreads --monitor-evals "
                                 "evaluations over its plan instead")
        elif args.monitor_evals is not None:
            raise UsageError("--monitor-evals is for --time-budget runs; --epochs runs evaluate every "
                             "--eval-every epochs")
    try:
        device = distributed.pick_device(args.device, world.local_rank)
        folder = open_folder(data_dir)
        val = open_folder(val_dir, classes=folder.classes) if val_dir else None
    except (ValueError, DataError) as err:
        raise UsageError(str(err)) from None
    if val is not None and (len(folder.labeled) == 0 or len(val.labeled) == 0):
        raise UsageError("--val needs labeled sub-folders (one per class) in both DATA_DIR and the val "
                         "folder, with matching names")
    explicit = set(_given_hyper_parameters(args))
    if state is None:
        try:
            config.notes = fit_to_data(config, len(folder.refs), batch_size_given=args.batch_size is not None)
            config.notes += fit_recipe(config, explicit)
            config.notes += fit_crops(config)
            validate(config)
        except ConfigError as err:
            raise UsageError(str(err)) from None
        if config.time_budget is None:  # budget runs adjust once the plan exists (moco.train)
            steps_per_epoch = len(folder.refs) // config.batch_size
            config.notes += fit_to_plan(config, explicit, num_images=len(folder.refs),
                                        planned_steps=config.epochs * steps_per_epoch,
                                        steps_per_epoch=steps_per_epoch)
        for note in config.notes:
            say(f"note: {note}")
    if config.batch_size % world.size:
        raise UsageError(f"--batch-size {config.batch_size} is the global batch: it must be divisible by the "
                         f"{world.size} processes")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file on the way, no permission, read-only storage
        raise UsageError(f"cannot make the run folder {run_dir}: {err.strerror or err}") from None
    processes = f", {world.size} processes" if world.enabled else ""
    length = (f"a {format_duration(config.time_budget)} time budget" if config.time_budget is not None
              else f"{config.epochs} epochs")
    say(f"{'resuming' if state else 'training'} {config.preset} {config.arch} on {len(folder.refs)} images "
        f"from {data_dir} for {length} ({device.type}{processes}); run folder {run_dir}")
    kept_precision = config.precision != "auto" and bool(config.precision_reason)
    distributed.init(world, device)
    try:
        # The Trainer resolves --precision auto (on a bf16-capable CPU by timing both precisions)
        trainer = Trainer(config, folder, run_dir, device=device, val=val, state=state, world=world,
                          explicit=explicit, started=started)
        say(f"precision: {config.precision}, kept from the checkpoint ({config.precision_reason})" if kept_precision
            else f"precision: {config.precision_reason}")
        say("configuration: " + json.dumps(config.to_dict(), sort_keys=True))
        progress = trainer.run()
    except TrainingStopped as stop:
        say(f"{stop}; checkpoint saved in {run_dir}. Continue with: python -m moco train --resume {run_dir}")
        return 128 + stop.signum
    except TrainingDiverged as err:
        if world.is_main:
            print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    skipped = len(progress.skipped)
    if trainer.plan.mode == "budget":
        length = (f"{progress.step} steps ({trainer.plan.epochs_exact(progress.step):.2f} epochs) in "
                  f"{progress.elapsed / 60:.1f} min of the {format_duration(config.time_budget)} budget")
    else:
        length = f"{progress.epoch} epochs, {progress.step} steps in {progress.elapsed / 60:.1f} min"
    say(f"done: {length}; {skipped} file{'s' if skipped != 1 else ''} skipped; checkpoint "
        f"{run_dir / CHECKPOINT_NAME}")
    quality = trainer.last_quality
    if quality is not None:
        label = {"learned": "quality", "not_learned": "warning", "unmeasured": "quality"}[quality["verdict"]]
        say(f"{label}: {quality['reason']}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from moco.backbones import build_backbone
    from moco.checkpoint import CheckpointError, load_backbone
    from moco.config import resolve_stem
    from moco.data import DataError, open_folder
    from moco.distributed import pick_device
    from moco.evaluate import evaluate_backbone, format_table, recalibrate_batchnorm

    try:
        backbone, config_dict = load_backbone(args.checkpoint)
        device = pick_device(args.device)
        train = open_folder(args.train)
        val = open_folder(args.val, classes=train.classes)
    except (CheckpointError, DataError, ValueError) as err:
        raise UsageError(str(err)) from None
    if len(train.labeled) == 0 or len(val.labeled) == 0:
        raise UsageError("eval needs labeled sub-folders (one per class) in both --train and --val")
    if args.seeds < 1:
        raise UsageError("--seeds must be at least 1")
    config = TrainConfig.from_dict(config_dict)
    backbone = backbone.to(device)
    if args.random_init:
        torch.manual_seed(config.seed)
        backbone = build_backbone(config.arch, stem=resolve_stem(config), image_size=config.image_size).to(device)
        recalibrate_batchnorm(backbone, train, image_size=config.image_size, mean=config.mean, std=config.std,
                              device=device, workers=args.workers, seed=config.seed)
    if config.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    from moco import step_timing
    from moco.precision import resolve_precision

    # On a CPU with native bf16 whether it pays depends on the shapes: time this backbone's forward.
    precision, reason = resolve_precision(
        args.precision, device, timed="the backbone's forward",
        rates=lambda: step_timing.forward_rates(backbone, config.image_size, device,
                                                channels_last=config.channels_last))
    print(f"precision of feature extraction: {reason}", file=sys.stderr)
    try:
        results, failures = evaluate_backbone(
            backbone, train, val, image_size=config.image_size, mean=config.mean, std=config.std,
            device=device, workers=args.workers, seeds=tuple(range(args.seeds)),
            knn_k=config.knn_k, knn_t=config.knn_t, precision=precision)
    except ValueError as err:
        raise UsageError(str(err)) from None
    for failure in failures:
        print(f"skipped {failure.relpath}: {failure.reason}", file=sys.stderr)
    if args.json:
        print(json.dumps(results))
    else:
        what = "random-init " if args.random_init else ""
        print(format_table(results, f"{what}{config.arch} @ {config.image_size}px: {len(train.labeled)} train, "
                                    f"{len(val.labeled)} val images, {len(train.classes)} classes"))
    return 0


def run_demo_data(args: argparse.Namespace) -> int:
    from moco.demo import write_digits

    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    count = write_digits(out)
    print(f"wrote {count} digit images in 10 class folders under {out}")
    return 0


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """`started`: time.monotonic() at process start (a --time-budget counts from it); by default
    the moment main() is called."""
    started = time.monotonic() if started is None else started
    args = build_parser().parse_args(argv)
    commands = {"train": lambda a: run_train(a, started), "eval": run_eval, "demo-data": run_demo_data}
    try:
        return commands[args.command](args)
    except UsageError as err:
        print(f"python -m moco {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(started=time.monotonic() - process_age()))
