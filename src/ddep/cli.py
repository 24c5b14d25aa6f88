"""The ``ddep`` command line."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__


def cmd_models(args: argparse.Namespace) -> int:
    """Print the architectures, their options and the weights that work offline."""
    from .models import OFFLINE_WEIGHTS, arch_options, list_archs
    from .models.registry import get_arch

    for name in list_archs():
        print(f"{name}  (default encoder: {get_arch(name).default_encoder})")
        for key, default in arch_options(name).items():
            print(f"    {key} = {default!r}")
    print("offline encoder weights (encoder_weights=NAME):")
    for name, weights in OFFLINE_WEIGHTS.items():
        print(f"    {name}: {weights.description}; encoder {weights.encoder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddep", description="Decoder Denoising Pretraining for label-efficient semantic segmentation."
    )
    parser.add_argument("--version", action="version", version=f"ddep {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    models = commands.add_parser("models", help="list architectures, their options and offline encoder weights")
    models.set_defaults(run=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"ddep {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
