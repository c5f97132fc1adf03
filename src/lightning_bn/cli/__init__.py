"""The ``lightning-bn`` command: reproduce the paper's experiments, or draw the figures of runs.

Usage::

    lightning-bn reproduce [mnist1d|digits|dln|vgg-cifar10] [--quick] [--out DIR] [--lr LR ...]
                           [--steps N] [--seed S] [--seeds N] [--init kaiming|default]
                           [--jobs N] [--data-dir DIR] [--variants K,K,...]
                           [--archs A,A,...] [--measure-every N] [--wandb MODE] ...
    lightning-bn plot RUN [RUN ...] [--labels A,B,...] [--out DIR] [--steps FROM:TO]

Invalid arguments end the command with one line on stderr and exit status 2.
"""

import argparse
from collections.abc import Sequence

from lightning_bn.cli import plot, reproduce
from lightning_bn.cli._common import Parser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-bn`` argument parser (sub-commands ``reproduce`` and ``plot``)."""
    parser = Parser(
        prog="lightning-bn",
        description='Reproduce "How Does Batch Normalization Help Optimization?" '
        "(Santurkar et al., 2018) with PyTorch Lightning.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    reproduce.add_parser(sub)
    plot.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lightning-bn`` command.

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``: run as the
            command, whose process ends when this returns; an interrupted ``reproduce`` then
            ignores further Ctrl-C while the process exits).

    Returns:
        The exit status (0 on success; argument errors exit with 2 through ``SystemExit``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.until_exit = argv is None
    status: int = args.handler(args.subparser, args)
    return status
