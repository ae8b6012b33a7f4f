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
    except BrokenPipeError:  # `nanor1 tasks | head`
        return 0
    except KeyboardInterrupt:
        print(f"nanor1 {args.command}: interrupted; finished work is saved and `--resume` continues it",
              file=sys.stderr)
        return 130
    return int(rc or 0)


# ----------------------------------------------------------------------------- subcommands
# (each block: _add_X builds the parser, _cmd_X calls the stage function)

def _add_tasks(p):
    pass


def _cmd_tasks(args):
    from nanor1.tasks import format_task_list
    print(format_task_list())


def _add_tokenizer(p):
    p.add_argument("out_dir", help="folder to write tokenizer.json (+ transformers files) to")
    p.add_argument("--vocab-size", type=int, default=512)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default="chain_sum", help="train on a corpus generated from this task")
    src.add_argument("--files", nargs="+", help="train on these .txt / .jsonl files instead")
    p.add_argument("--n-docs", type=int, default=20_000)


def _cmd_tokenizer(args):
    from nanor1.checkpoint import write_manifest
    from nanor1.tokenizer import train_tokenizer_from_files, train_tokenizer_from_task
    if args.files:
        tok = train_tokenizer_from_files(args.files, args.vocab_size, args.out_dir)
    else:
        tok = train_tokenizer_from_task(args.task, args.vocab_size, args.out_dir, n_docs=args.n_docs)
    write_manifest(args.out_dir, "tokenizer", config=vars(args) | {"_run": None})
    print(f"tokenizer with {tok.vocab_size} tokens written to {args.out_dir}")


def _add_stage(p):
    _add_config_args(p)


def _stage(module: str, fn: str, cls: str):
    def run(args):
        import importlib
        from nanor1.config import load_config
        mod = importlib.import_module(module)
        cfg = load_config(getattr(mod, cls), args.config, args.overrides)
        out = getattr(mod, fn)(cfg)
        print(f"done: {out}")
    return run


COMMANDS += [
    ("tasks", "list the built-in and reasoning-gym tasks", _add_tasks, _cmd_tasks),
    ("tokenizer", "train a byte-level BPE tokenizer with the R1 special tokens", _add_tokenizer, _cmd_tokenizer),
    ("pretrain", "pretrain a base model (key=value overrides of PretrainConfig)", _add_stage,
     _stage("nanor1.pretrain", "pretrain", "PretrainConfig")),
    ("sft", "supervised fine-tuning on chat data (key=value overrides of SFTConfig)", _add_stage,
     _stage("nanor1.sft", "sft", "SFTConfig")),
    ("grpo", "GRPO reinforcement learning with rule-based rewards (key=value overrides of GRPOConfig)",
     _add_stage, _stage("nanor1.grpo", "grpo", "GRPOConfig")),
]


if __name__ == "__main__":
    sys.exit(main())
