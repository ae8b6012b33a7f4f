"""The `nanor1` command line: parses arguments and calls the stage functions. Nothing else lives here.

Each subcommand has one `_cmd_<name>(args)` function and one `_add_<name>(sub)` parser builder,
registered in COMMANDS at the bottom. User errors (NanoR1Error) print as one line and exit 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from nanor1.common import NanoR1Error


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """Every stage takes a YAML config and key=value overrides."""
    p.add_argument("--config", help="YAML file with the run config")
    p.add_argument("overrides", nargs="*", help="settings as key=value, nested ones dotted (e.g. steps=100 "
                   "optim.lr=3e-4); --help lists them all with their defaults")


COMMANDS: list[tuple[str, str, callable, callable]] = []  # (name, help, add_parser, run)


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser; a stage's --help ends with every setting of its config and its default (the
    config class is imported only then, so other commands start without loading torch)."""
    config: tuple[str, str] | None = None  # (module, class)

    def format_help(self) -> str:
        text = super().format_help()
        if self.config is None:
            return text
        import importlib
        from nanor1.config import describe
        cls = getattr(importlib.import_module(self.config[0]), self.config[1])
        return text + "\nsettings (key=value; defaults shown):\n" + "".join(f"  {line}\n" for line in describe(cls()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanor1", description="The DeepSeek-R1 recipe, end to end, small and fast.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, help_text, add, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.config = getattr(run, "config", None)
        p.set_defaults(_run=run)
    return parser


def _check_paths_are_not_settings(args, extra: list[str]) -> None:
    """Commands that take paths (tokenizer, export, import, info, report) would otherwise read or write a
    folder named like `vocab_size=1024` when a user writes them in the stage commands' key=value style; `extra`
    holds the arguments the command did not take (a third `key=value` after two paths, say)."""
    settings = [] if hasattr(args, "overrides") else list(vars(args).items()) + [("argument", a) for a in extra]
    for name, value in settings:
        if isinstance(value, str) and re.match(r"\w+=", value) and not Path(value).exists():
            raise NanoR1Error(f"{name} {value!r} looks like a key=value setting, but `nanor1 {args.command}` takes "
                              f"paths and --options; see `nanor1 {args.command} --help`")
    if extra:
        raise NanoR1Error(f"unrecognized arguments: {' '.join(extra)}; see `nanor1 {args.command} --help`")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    from nanor1.common import tune_cpu
    tune_cpu()
    try:
        _check_paths_are_not_settings(args, extra)
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
    run.config = (module, cls)
    return run


def _add_eval(p):
    _add_config_args(p)
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="two models, results.json files or eval folders, side by side with the difference")


def _cmd_eval(args):
    from nanor1.config import load_config
    from nanor1.evaluate import EvalConfig, evaluate, format_compare_markdown, format_results_markdown, run_compare
    cfg = load_config(EvalConfig, args.config, args.overrides)
    if args.compare:
        print(format_compare_markdown(run_compare(cfg, *args.compare)))
    else:
        print(format_results_markdown(evaluate(cfg)))


_cmd_eval.config = ("nanor1.evaluate", "EvalConfig")


def _add_report(p):
    p.add_argument("run_dir", help="a run folder (the out_dir of any stage, or a speedrun folder)")


def _cmd_report(args):
    from nanor1.report import write_report
    print(write_report(args.run_dir))


def _add_speedrun(p):
    p.add_argument("--quick", action="store_true", help="the ~2 minute smoke run CI uses (smaller, an easier task, looser)")
    _add_config_args(p)


def _cmd_speedrun(args):
    from nanor1.config import load_config
    from nanor1.speedrun import SpeedrunConfig, speedrun
    base = SpeedrunConfig.quick() if args.quick else SpeedrunConfig()
    speedrun(load_config(SpeedrunConfig, args.config, args.overrides, base=base))


_cmd_speedrun.config = ("nanor1.speedrun", "SpeedrunConfig")


def _add_serve(p):
    p.add_argument("model", help="a checkpoint or run folder, a Hugging Face model folder or a .gguf file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require this key on /v1 routes (default: $NANOR1_API_KEY)")
    p.add_argument("--device", default=None)
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for")
    p.add_argument("--name", default=None, help="the model name clients use (default: the folder name)")


def _cmd_serve(args):
    from nanor1.serve.protocol import ServeLimits
    from nanor1.serve.server import serve
    limits = ServeLimits(max_tokens=args.max_tokens) if args.max_tokens else None
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, device=args.device,
          max_batch=args.max_batch, limits=limits, model_name=args.name)


def _add_chat(p):
    p.add_argument("model", help="a checkpoint or run folder, a Hugging Face model folder or a .gguf file")
    p.add_argument("--device", default=None)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="a system message")


def _cmd_chat(args):
    from nanor1.chat import ChatSettings, chat
    chat(args.model, device=args.device, settings=ChatSettings(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed,
        system=args.system))


def _add_export(p):
    p.add_argument("--format", choices=["hf"], default="hf", help="hf: the DeepseekV3ForCausalLM layout")
    p.add_argument("checkpoint")
    p.add_argument("out")


def _cmd_export(args):
    from nanor1.export import export_hf
    print(export_hf(args.checkpoint, args.out))


def _add_import(p):
    p.add_argument("hf_dir", help="a DeepSeek-V3-layout Hugging Face model folder")
    p.add_argument("out", help="the nanor1 checkpoint folder to write")


def _cmd_import(args):
    from nanor1.export import import_hf_model
    print(import_hf_model(args.hf_dir, args.out))


def _add_info(p):
    p.add_argument("model", nargs="?", help="a checkpoint, run folder or DeepSeek-V3-layout HF folder")
    p.add_argument("--preset", help="a model preset instead (tiny, speedrun, small, v3)")


def _cmd_info(args):
    from nanor1.info import model_info
    print(model_info(preset=args.preset, path=args.model))


COMMANDS += [
    ("tasks", "list the built-in and reasoning-gym tasks", _add_tasks, _cmd_tasks),
    ("tokenizer", "train a byte-level BPE tokenizer with the R1 special tokens", _add_tokenizer, _cmd_tokenizer),
    ("pretrain", "pretrain a base model (key=value overrides of PretrainConfig)", _add_stage,
     _stage("nanor1.pretrain", "pretrain", "PretrainConfig")),
    ("sft", "supervised fine-tuning on chat data (key=value overrides of SFTConfig)", _add_stage,
     _stage("nanor1.sft", "sft", "SFTConfig")),
    ("grpo", "GRPO reinforcement learning with rule-based rewards (key=value overrides of GRPOConfig)",
     _add_stage, _stage("nanor1.grpo", "grpo", "GRPOConfig")),
    ("rejection-sample", "sample k answers per problem, keep the correct readable ones as SFT data", _add_stage,
     _stage("nanor1.rejection", "rejection_sample", "RejectionConfig")),
    ("distill", "fine-tune a student on a teacher's correct reasoning traces", _add_stage,
     _stage("nanor1.distill", "distill", "DistillConfig")),
    ("eval", "evaluate models with R1's protocol (pass@1, cons@k, pass@k, intervals)", _add_eval, _cmd_eval),
    ("report", "write the HTML + Markdown report of a run folder", _add_report, _cmd_report),
    ("speedrun", "the whole R1 story at toy scale on a CPU, with a report", _add_speedrun, _cmd_speedrun),
    ("export", "export a checkpoint for transformers / vLLM", _add_export, _cmd_export),
    ("import", "import a DeepSeek-V3-layout Hugging Face folder as a nanor1 checkpoint", _add_import, _cmd_import),
    ("info", "parameters (total/active), KV-cache bytes per token and its saving over MHA", _add_info, _cmd_info),
    ("serve", "an OpenAI-compatible server with a browser chat at /", _add_serve, _cmd_serve),
    ("chat", "chat with a model in the terminal", _add_chat, _cmd_chat),
]


if __name__ == "__main__":
    sys.exit(main())
