"""Every reasoning-gym dataset as a nanor1 Task (`rg:<name>`), scored by reasoning-gym's own scorer.

Options: `difficulty=k` sets every curriculum attribute to level k; any other option is a field of the
dataset's reasoning-gym config (e.g. `rg:chain_sum min_terms=2 max_terms=3`).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Iterator

from nanor1.common import NanoR1Error
from nanor1.tasks.base import Problem, Task, make_problem

PREFIX = "rg:"
_CHUNK = 256  # items per reasoning-gym dataset object; some datasets build their items eagerly


def _registry() -> dict:
    import reasoning_gym  # noqa: F401  (importing registers every dataset)
    from reasoning_gym.factory import DATASETS
    return DATASETS


def list_gym_tasks() -> list[tuple[str, str]]:
    out = []
    for name, (ds_cls, cfg_cls) in sorted(_registry().items()):
        doc = (ds_cls.__doc__ or cfg_cls.__doc__ or "").strip()
        module = ds_cls.__module__.split(".")
        desc = doc.splitlines()[0].rstrip(".") if doc else f"reasoning-gym {module[1] if len(module) > 2 else ''} task"
        out.append((PREFIX + name, desc))
    return out


class GymTask(Task):
    """One reasoning-gym dataset; problems() draws seeded chunks of it and keeps those of the asked split."""

    give_up_after = 5_000

    def __init__(self, name: str, difficulty: int | None = None, eval_fraction: float = 0.1, **options: Any):
        registry = _registry()
        if name not in registry:
            raise NanoR1Error(f"unknown reasoning-gym task {name!r}; `nanor1 tasks` lists them")
        self.rg_name, self.name, self.eval_fraction = name, PREFIX + name, float(eval_fraction)
        self.difficulty = None if difficulty is None else int(difficulty)
        self._ds_cls, self._cfg_cls = registry[name]
        fields = {f.name for f in dataclasses.fields(self._cfg_cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise NanoR1Error(f"task {self.name}: unknown option(s) {unknown}; known options: "
                              f"{sorted(fields - {'seed', 'size'}) + ['difficulty', 'eval_fraction']}")
        base: dict[str, Any] = {}
        if self.difficulty is not None:
            base = self._level_config(self.difficulty)
        base.update(options)
        base.pop("seed", None), base.pop("size", None)
        self._base = base
        self._scorer = self._dataset(seed=0, size=1)  # score_answer only reads the entry
        self.description = (self._ds_cls.__doc__ or "").strip().split("\n")[0]

    def _level_config(self, level: int) -> dict[str, Any]:
        from reasoning_gym.factory import create_curriculum, has_curriculum
        if not has_curriculum(self.rg_name):
            raise NanoR1Error(f"task {self.name} has no difficulty levels; set its config fields instead")
        if level < 0:
            raise NanoR1Error(f"task {self.name}: difficulty must be >= 0, got {level}")
        cur = create_curriculum(self.rg_name)
        cur.set_global_level(level)  # levels above an attribute's maximum use its maximum
        cfg = cur.generate_configuration()
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}

    def _dataset(self, seed: int, size: int):
        from nanor1.config import from_dict
        try:
            try:
                cfg = from_dict(self._cfg_cls, {**self._base, "seed": seed, "size": size})  # coerces "3" -> 3
            except (NameError, TypeError):  # annotations typing cannot resolve: pass as given
                cfg = self._cfg_cls(**self._base, seed=seed, size=size)
            return self._ds_cls(config=cfg)
        except NanoR1Error as e:
            raise NanoR1Error(f"task {self.name}: {e}") from None
        except (AssertionError, ValueError, TypeError, KeyError) as e:
            raise NanoR1Error(f"task {self.name}: invalid configuration {self._base} ({e})") from None

    def generate(self, rng: random.Random) -> Iterator[Problem]:
        while True:
            ds = self._dataset(seed=rng.randrange(2 ** 31), size=_CHUNK)
            for i in range(_CHUNK):
                entry = ds[i]
                # Some datasets (graph_color, rubiks_cube, ...) have many valid answers and no reference:
                # their answer is None, which we keep as "" (the scorer verifies instead).
                answer = "" if entry["answer"] is None else str(entry["answer"])
                yield make_problem(self.name, str(entry["question"]), answer,
                                   entry=entry, difficulty=self.difficulty)

    def score(self, answer: str | None, problem: Problem) -> float:
        if answer is None:
            return 0.0
        entry = problem.meta.get("entry")
        if entry is None:
            raise NanoR1Error(f"task {self.name}: problem {problem.id} lacks its reasoning-gym entry in meta")
        try:
            s = float(self._scorer.score_answer(answer, entry))
        except Exception:  # a third-party scorer choking on malformed model text means a wrong answer
            return 0.0
        return min(max(s, 0.0), 1.0) if math.isfinite(s) else 0.0
