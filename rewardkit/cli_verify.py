"""``rewardkit verify [names...]``: rewardkit vs the upstream implementations on real weights (see rewardkit.verify)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_commands", "COMMANDS", "parse_options"]


def add_commands(commands: Any) -> None:
    """Register ``verify`` on the main parser's sub-parsers."""
    from rewardkit.verify import CHECKS

    verify = commands.add_parser("verify", help="score reference images with rewardkit and the upstream code on "
                                 "real weights (needs network or cached weights)")
    verify.add_argument("names", nargs="*", metavar="NAME", help=f"rewards to check (default: {' '.join(CHECKS)})")
    verify.add_argument("--set", dest="options", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="a load option of one check, e.g. fid.weights=/path/inception-2015-12-05.pt or "
                        "aesthetic.clip_weights=hf:openai/clip-vit-large-patch14 (URLs download from there: "
                        "use it to route downloads through a mirror); repeatable")
    verify.add_argument("--out", metavar="FILE", help="also write the table (.md) or the rows (.json) here")


def parse_options(items: list[str]) -> dict[str, dict[str, str]]:
    """``["fid.weights=x", "hpsv2.1.config=c.json"]`` -> ``{"fid": {"weights": "x"}, "hpsv2.1": {"config": "c.json"}}``.

    Raises:
        ValueError: an item that is not ``NAME.KEY=VALUE``.
    """
    options: dict[str, dict[str, str]] = {}
    for item in items:
        target, equals, value = item.partition("=")
        name, dot, key = target.rpartition(".")  # names may hold a dot (hpsv2.1), keys do not
        if not (equals and dot and name and key):
            raise ValueError(f"rewardkit verify: --set expects NAME.KEY=VALUE, got {item!r}; "
                             "e.g. --set fid.weights=/path/to/inception-2015-12-05.pt")
        options.setdefault(name, {})[key] = value
    return options


def _cmd_verify(args: argparse.Namespace) -> None:
    from rewardkit.verify import format_table, run_verify, write_table

    checks = run_verify(args.names or None, parse_options(args.options))
    print(format_table(checks))
    skipped = [c for c in checks if c.passed is None]
    for check in skipped:
        print(f"{check.reward}: {check.note}")
    if args.out:
        print(f"wrote {write_table(checks, args.out)}")
    failed = [c.reward for c in checks if c.passed is False]
    if failed:
        raise ValueError(f"rewardkit verify: {', '.join(failed)} differ from upstream beyond the tolerance")


COMMANDS = {"verify": _cmd_verify}
