"""Tasks with verifiable answers: built-in generators, every reasoning-gym dataset (`rg:<name>`), user files.

`get_task("chain_sum", terms=6)`, `get_task("rg:basic_arithmetic", difficulty=1)`, `get_task("data.jsonl")`;
`nanor1 tasks` prints `format_task_list()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nanor1.common import NanoR1Error
from nanor1.tasks.arithmetic import BUILTINS, make_builtin
from nanor1.tasks.base import Problem, Split, Task, split_of
from nanor1.tasks.decontam import OverlapReport, ngram_overlap

__all__ = ["Problem", "Split", "Task", "get_task", "list_tasks", "format_task_list", "ngram_overlap",
           "OverlapReport", "split_of"]

_FILE_SUFFIXES = (".jsonl", ".parquet")


def get_task(spec: str, **options: Any) -> Task:
    """A built-in name, "rg:<reasoning_gym_name>", or a path to a .jsonl/.parquet file or datasets folder."""
    if not isinstance(spec, str) or not spec:
        raise NanoR1Error(f"task must be a name, rg:<name> or a data path, got {spec!r}")
    if spec in BUILTINS:
        return make_builtin(spec, **options)
    if spec.startswith("rg:"):
        from nanor1.tasks.gym import GymTask
        return GymTask(spec[3:], **options)
    if spec.endswith(_FILE_SUFFIXES) or Path(spec).is_dir():
        from nanor1.tasks.files import FileTask
        known = {"question_field", "answer_field", "scorer", "eval_fraction", "eval_file", "size"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise NanoR1Error(f"task {spec}: unknown option(s) {unknown}; known options: {sorted(known)}")
        return FileTask(spec, **options)
    raise NanoR1Error(f"unknown task {spec!r}: use a built-in ({', '.join(BUILTINS)}), rg:<name> "
                      "(see `nanor1 tasks`), or a .jsonl/.parquet file or datasets folder")


def list_tasks() -> list[tuple[str, str]]:
    """(name, description) for every built-in and every reasoning-gym dataset."""
    from nanor1.tasks.gym import list_gym_tasks
    return [(name, cls.description) for name, (cls, _) in BUILTINS.items()] + list_gym_tasks()


def format_task_list() -> str:
    """The text `nanor1 tasks` prints."""
    rows = list_tasks()
    width = max(len(n) for n, _ in rows)
    builtin = [f"  {n:<{width}}  {d}" for n, d in rows if not n.startswith("rg:")]
    gym = [f"  {n:<{width}}  {d}" for n, d in rows if n.startswith("rg:")]
    return "\n".join(["built-in tasks (options: the knobs shown, difficulty=0..4, eval_fraction):", *builtin, "",
                      f"reasoning-gym tasks ({len(gym)}; options: difficulty=<level>, any field of the "
                      "dataset's config):", *gym, "",
                      "user data: a .jsonl/.parquet file or a datasets folder "
                      "(options: question_field, answer_field, scorer=auto|math|exact, eval_file, size)"])
