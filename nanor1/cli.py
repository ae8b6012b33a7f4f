"""The `nanor1` command line: parses arguments and calls the stage functions. Nothing else lives here.

Each subcommand has one `_cmd_<name>(args)` function and one `_add_<name>(sub)` parser builder,
registered in COMMANDS at the bottom. User errors (NanoR1Error) print as one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from nanor1.common import NanoR1Error


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """Every stage takes a YAML config and key=value overrides."""
    p.add_argument("--config", help="YAML file with the run config")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. lr=3e-4 steps=100)")


COMMANDS: list[tuple[str, str, callable, callable]] = []  # (name, help, add_parser, run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanor1", description="The DeepSeek-R1 recipe, end to end, small and fast.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text, add, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args._run(args)
    except NanoR1Error as e:
        print(f"nanor1 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nanor1 {args.command}: interrupted; finished work is saved and `--resume` continues it",
              file=sys.stderr)
        return 130
    return int(rc or 0)


# ----------------------------------------------------------------------------- subcommands
# (each block: _add_X builds the parser, _cmd_X calls the stage function)


if __name__ == "__main__":
    sys.exit(main())
