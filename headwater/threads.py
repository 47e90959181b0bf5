"""The compute-thread budget: how many torch threads each role gets on one machine.

The indexer's embedder, the answerers' generator and the trainer's runs share one machine's
cores; torch's default (every core, in every process) oversubscribes it as soon as two of them
work at once, and the freshness path then waits behind training. The budget splits the cores:
embedding (the freshness path) gets the most, generation and training a quarter each, training
runs niced and pauses while the indexer lags (`trainer.freshness`). A role's own setting
(`embed_threads`, `generate_threads`, `train_threads`) overrides its share.

With three or more cores the shares sum to at most the cores; with one or two, each role still
needs a thread, and training is the one that yields (nice, paused on a backlog).

Idle worker threads must wait passively: a spinning OpenMP pool takes cores from the other roles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from headwater.settings import Settings

Role = Literal["embed", "generate", "train"]


def cores(settings: Settings) -> int:
    """Cores headwater may use here: `cpu_cores`, else the CPUs this process may run on."""
    if settings.cpu_cores:
        return settings.cpu_cores
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadBudget:
    cores: int
    embed: int
    generate: int
    train: int

    def of(self, *roles: Role) -> int:
        """Threads of a process serving `roles` (one process may host several: `headwater up`)."""
        return max(1, min(self.cores, sum(getattr(self, r) for r in roles)))


def budget(settings: Settings) -> ThreadBudget:
    c = cores(settings)
    train = settings.train_threads or max(1, c // 4)
    generate = settings.generate_threads or max(1, c // 4)
    embed = settings.embed_threads or max(1, c - train - generate)
    return ThreadBudget(cores=c, embed=embed, generate=generate, train=train)


def passive_waits() -> None:
    """Idle OpenMP threads sleep instead of spinning; call before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KMP_BLOCKTIME", "0")  # Intel's OpenMP spins 200 ms by default


def use_threads(settings: Settings, *roles: Role) -> int:
    """Set this process's torch threads to its roles' share; returns the count."""
    import torch

    n = budget(settings).of(*roles)
    torch.set_num_threads(n)
    return n
