"""The ``ddep`` command line."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__


def cmd_models(args: argparse.Namespace) -> int:
    """Print the architectures, their options and the weights that work offline."""
    from .models import OFFLINE_WEIGHTS, arch_options, list_archs
    from .models.registry import get_arch
    from .models.weights import TORCHVISION_TAG, torchvision_encoders

    for name in list_archs():
        print(f"{name}  (default encoder: {get_arch(name).default_encoder})")
        for key, default in arch_options(name).items():
            print(f"    {key} = {default!r}")
    print("smp:<Arch>: segmentation_models_pytorch's architectures; encoder: an smp encoder name or tu-<timm name>; "
          "decoder_width multiplies its *_channels options (Linknet has none)")
    print(f"encoder_weights=imagenet: torchvision's ImageNet-1k weights (timm tag {TORCHVISION_TAG}) where timm has them "
          f"({', '.join(torchvision_encoders())}), else timm's default tag; encoder_weights=default: timm's default tag")
    print("offline encoder weights (encoder_weights=NAME):")
    for name, weights in OFFLINE_WEIGHTS.items():
        print(f"    {name}: {weights.description}; encoder {weights.encoder}")
    return 0


def cmd_splits(args: argparse.Namespace) -> int:
    """Write seeded, nested label-fraction split files for a dataset's training images, or hold a
    val split out of them."""
    from .config import parse_key_value
    from .data import build_dataset
    from .data.splits import split_hash, write_splits, write_val_splits

    if bool(args.fractions) == bool(args.val):
        raise ValueError("ddep splits needs --fractions (label fractions) or --val (a held-out val split), one of them")
    options = dict(parse_key_value(item, "-o option") for item in args.option)
    dataset = build_dataset(args.dataset, args.root, split=args.split, **options)
    if args.val:
        for train, val in write_val_splits(args.dataset, dataset.pairs, args.val, args.seeds, args.out):
            print(f"{val}  {len(val.read_text().splitlines())} of {len(dataset)} images held out; fine-tune with "
                  f"data.options.split_file={train} data.val_split_file={val}")
        return 0
    for path, pairs in write_splits(args.dataset, dataset.pairs, args.fractions.split(","), args.seeds, args.out):
        print(f"{path}  {len(pairs)} of {len(dataset)} images  hash {split_hash(pairs)}")
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    """Write an image tree once as tar shards (WebDataset layout), or index shards written elsewhere."""
    import time

    from .data.shard_writer import index_shards, write_shards

    started = time.perf_counter()
    if args.index and (args.input or args.output):
        raise ValueError("ddep shards takes either --index DIR, or --input DIR and --output DIR")
    if args.index:
        index, folder = index_shards(args.index, workers=args.workers), args.index
    elif args.input and args.output:
        index = write_shards(args.input, args.output, max_size=args.max_size, per_shard=args.per_shard, quality=args.quality,
                             workers=args.workers)
        folder = args.output
    else:
        raise ValueError("ddep shards needs --input DIR and --output DIR (or --index DIR for shards written elsewhere)")
    size = sum(shard["bytes"] for shard in index["shards"])
    print(f"{folder}: {len(index['shards'])} shards, {index['samples']} images, {size / 2**30:.2f} GiB "
          f"({time.perf_counter() - started:.1f} s); pretrain with data.dataset=shards data.root={folder}")
    skipped = [pair for shard in index["shards"] for pair in shard["skipped"]]
    if skipped:
        shown = "; ".join(reason for _, reason in skipped[:3])
        print(f"{len(skipped)} unreadable files skipped ({shown}{'; ...' if len(skipped) > 3 else ''}); each shard's "
              f"are listed in {Path(folder) / 'index.json'}")
    return 0


def comma_ints(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_run(args: argparse.Namespace) -> int:
    """pretrain, finetune, evaluate, predict, export: a config file plus key=value overrides."""
    from .config import load_config

    config = load_config(args.command, args.config, args.overrides)
    if getattr(args, "dry_run", False):
        import json

        from .engine.finetune import plan_finetune
        from .engine.pretrain import plan_pretrain

        print(json.dumps({"command": args.command, **{"pretrain": plan_pretrain, "finetune": plan_finetune}[args.command](config)}))
        return 0
    if args.command in ("pretrain", "finetune"):
        from .engine.distributed import launched_rank
        from .engine.finetune import finetune
        from .engine.pretrain import pretrain
        from .engine.summary import finetune_summary, pretrain_summary

        train, summary = {"pretrain": (pretrain, pretrain_summary), "finetune": (finetune, finetune_summary)}[args.command]
        run_dir = train(config, resume=RESUME[args.resume])
        if launched_rank() == 0:  # the files it reads are rank 0's
            print(summary(run_dir))
    elif args.command == "evaluate":
        from .engine.evaluate import evaluate

        evaluate(config)
    elif args.command == "predict":
        from .engine.predict import predict_folder

        predict_folder(config)
    else:
        from .engine.export import export

        export(config)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole method on built-in data: pretraining, fine-tuning from two starts, a report."""
    from .experiments.demo import FULL, QUICK, run_demo

    out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    run_demo(out, QUICK if args.quick else FULL, fresh=args.fresh)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    """One of the paper's studies: a grid of pretraining and fine-tuning runs, a table and a plot."""
    from .engine.distributed import launched_world_size
    from .experiments.study import describe, list_studies, load_study, run_study, study_path

    if args.list or not args.name:
        for scale in ("demo", "paper"):
            print(f"{scale} scale: {', '.join(list_studies(scale))}")
        return 0 if args.list else 2
    if launched_world_size() > 1:
        raise ValueError("ddep experiment does not run under torchrun yet: it makes its runs one after another in one process")
    study = load_study(study_path(args.name, args.scale), args.out, args.overrides, args.seeds)
    if args.dry_run:
        print(describe(study))
    else:
        run_study(study, args.out)
    return 0


#: --resume's value: None (the config's ``resume``), a bare --resume (True) or --resume auto
RESUME = {None: None, "true": True, "auto": "auto"}

RUN_COMMANDS = {
    "pretrain": "denoising pretraining of the decoder (DDeP) or the whole model (DeP)",
    "finetune": "fine-tune on labeled images from a pretraining checkpoint, an encoder, or scratch",
    "evaluate": "mIoU of a checkpoint on a labeled split (whole, slide, flip and multi-scale)",
    "predict": "class-id masks and colour overlays for an image or a folder of images (never over an existing file)",
    "export": "a checkpoint as safetensors + JSON config, smp's own folder for smp models (optionally ONNX)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddep", description="Decoder Denoising Pretraining for label-efficient semantic segmentation."
    )
    parser.add_argument("--version", action="version", version=f"ddep {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="run DDeP end to end on built-in data (under 10 minutes on two CPU cores)")
    demo.add_argument("--out", help="output folder (default: runs/demo, or runs/demo-quick with --quick)")
    demo.add_argument("--quick", action="store_true", help="a 1-minute version: fewer labels, seeds and steps")
    demo.add_argument("--fresh", action="store_true", help="rerun everything instead of reusing finished runs")
    demo.set_defaults(run=cmd_demo)
    experiment = commands.add_parser(
        "experiment", help="run one of the paper's studies (a grid of runs) and write its table and plot",
        description="Run one of the paper's studies: every pretraining and fine-tuning run it needs (finished runs are "
                    "reused, interrupted ones resume), then a table (markdown, CSV) and a plot of mIoU, mean ± std over seeds.")
    experiment.add_argument("name", nargs="?", help="a study (see --list) or a study file NAME.yaml")
    experiment.add_argument("--scale", default="demo", help="demo (built-in data, a CPU) or paper (real datasets; pass their roots)")
    experiment.add_argument("--out", default="runs/experiments", help="output folder (default: runs/experiments)")
    experiment.add_argument("--seeds", type=comma_ints, help="comma-separated seeds, instead of the study's")
    experiment.add_argument("--dry-run", action="store_true", help="print the runs the study needs and stop")
    experiment.add_argument("--list", action="store_true", help="list the studies")
    experiment.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                            help="overrides of every run, e.g. pretrain.data.root=/data/in21k finetune.data.root=/data/cityscapes")
    experiment.set_defaults(run=cmd_experiment)
    models = commands.add_parser("models", help="list architectures, their options and offline encoder weights")
    models.set_defaults(run=cmd_models)
    splits = commands.add_parser("splits", help="write label-fraction split files (nested, seeded), or hold out a val split")
    splits.add_argument("--dataset", required=True, help="cityscapes, ade20k, pascal_context or folder")
    splits.add_argument("--root", required=True, help="the dataset root folder")
    splits.add_argument("--fractions", help="label fractions, comma-separated: fractions (1/30, 0.05) or image counts (100)")
    splits.add_argument("--val", metavar="AMOUNT", help="instead, hold AMOUNT (0.2, or a count) out as a val split: "
                                                        "train.txt and val.txt, for a folder without a val folder")
    splits.add_argument("--seeds", type=comma_ints, default=[0], help="comma-separated seeds (default: 0)")
    splits.add_argument("--out", default="splits", help="output folder (default: splits)")
    splits.add_argument("--split", default="train", help="the split to draw from (default: train)")
    splits.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="dataset option, e.g. -o num_classes=5 for a folder dataset")
    splits.set_defaults(run=cmd_splits)
    from .config import SHARD_MAX_SIZE as DEFAULT_MAX_SIZE
    from .config import SHARD_PER_SHARD as DEFAULT_PER_SHARD
    from .config import SHARD_QUALITY as DEFAULT_QUALITY

    shards = commands.add_parser(
        "shards", help="write an image tree once as tar shards (WebDataset layout) for pretraining at scale",
        description="Write every image under --input (the unlabeled dataset's rules) as JPEG members of tar shards in the "
                    "WebDataset layout, shrunk to a longer side of at most --max-size, with index.json (sample counts). "
                    "Rerun the same command after a crash: finished shards are kept. Pretrain with data.dataset=shards.")
    shards.add_argument("--input", help="the image folder (searched recursively; class folders are fine)")
    shards.add_argument("--output", help="the shard folder to write (created; a rerun finishes it)")
    shards.add_argument("--index", metavar="DIR", help="instead, write index.json for WebDataset shards made elsewhere (timm's, "
                                                       "OpenCLIP's, img2dataset's: every DIR/*.tar) so that pretraining reads them")
    shards.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE,
                        help=f"longer side kept, in pixels (default {DEFAULT_MAX_SIZE}: 224 px pretraining crops at full detail)")
    shards.add_argument("--per-shard", type=int, default=DEFAULT_PER_SHARD, help=f"images per shard (default {DEFAULT_PER_SHARD})")
    shards.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help=f"JPEG quality (default {DEFAULT_QUALITY})")
    shards.add_argument("--workers", type=int, default=None, help="processes writing (or counting) shards (default: every core)")
    shards.set_defaults(run=cmd_shards)
    for name, help_text in RUN_COMMANDS.items():
        command = commands.add_parser(name, help=help_text, description=help_text + ". Settings: --config FILE.yaml, then KEY=VALUE overrides (dotted keys, e.g. optim.lr=1e-4).")
        command.add_argument("--config", help="a YAML config file (see configs/)")
        if name in ("pretrain", "finetune"):
            command.add_argument("--resume", nargs="?", const="true", choices=["true", "auto"], default=None,
                                 help="continue the run from its checkpoints/last.pt; --resume auto: continue a run of the "
                                      "same config if the folder holds one, else start (resubmit the same command as is)")
            command.add_argument("--dry-run", action="store_true",
                                 help="print the run's plan (steps, images per step, passes over the data) as JSON and stop")
        command.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.root=data/cityscapes")
        command.set_defaults(run=cmd_run)
    return parser


def resume_values(argv: list[str]) -> list[str]:
    """``--resume`` -> ``--resume=true``, ``--resume auto`` -> ``--resume=auto``: a bare --resume
    takes no value, so that KEY=VALUE overrides may follow it."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--resume":
            value = "auto" if argv[i + 1:i + 2] == ["auto"] else "true"
            out.append(f"--resume={value}")
            i += 2 if value == "auto" else 1
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    parser = build_parser()
    argv = resume_values(list(sys.argv[1:] if argv is None else argv))
    # KEY=VALUE overrides may come after options (``NAME --scale paper a.b=1``), which argparse
    # alone does not allow for a second positional list.
    args, rest = parser.parse_known_args(argv)
    if rest:
        if not hasattr(args, "overrides") or any(r.startswith("-") or "=" not in r for r in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides += rest
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    from .engine.preemption import EXIT_PREEMPTED, Preempted

    try:
        return args.run(args)
    except Preempted as e:  # the checkpoint is written: the same command with --resume auto continues
        print(f"ddep {args.command}: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except (ValueError, OSError, RuntimeError, FloatingPointError) as e:
        message = str(e)
        if type(e).__name__ == "OutOfMemoryError" or "out of memory" in message.lower():
            message = (f"out of {'GPU ' if 'CUDA' in message else ''}memory ({(message.splitlines() or [''])[0][:160]}): try a "
                       "smaller data.batch_size with a larger optim.grad_accum (the same images per step), or amp=bf16")
        print(f"ddep {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
