"""Task names: MeZO's spelling, matched without regard to case, '-', '_' or spaces (``sst-2``, ``SST2``, ``wic``)."""

from __future__ import annotations

import difflib

from zo2.errors import ConfigError
from zo2.tasks.base import Task
from zo2.tasks.classification import CLASSIFICATION_TASKS
from zo2.tasks.qa import QA_TASKS

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in CLASSIFICATION_TASKS + QA_TASKS}
"""Every task by its canonical (MeZO) name, in the order of the MeZO paper's tables."""


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def task_names() -> list[str]:
    """The canonical task names."""
    return list(TASKS)


def get_task(name: str | Task) -> Task:
    """The task called ``name`` (any case, '-' and '_' ignored: 'sst-2', 'SST2', 'wic'); a Task passes through.

    Raises ConfigError with a did-you-mean and the list of tasks for an unknown name."""
    if isinstance(name, Task):
        return name
    by_key = {_key(n): cls for n, cls in TASKS.items()}
    cls = by_key.get(_key(str(name)))
    if cls is None:
        close = difflib.get_close_matches(_key(str(name)), list(by_key), n=1, cutoff=0.6)
        hint = f" Did you mean '{by_key[close[0]].name}'?" if close else ""
        raise ConfigError(f"Unknown task {name!r}.{hint} The tasks are: {', '.join(TASKS)} (set task.name to one "
                          "of them).")
    return cls()
