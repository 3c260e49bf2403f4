"""How many CPU threads torch uses in a training process.

torch's OpenMP runtime (libgomp in the Linux wheels) lets a thread that reaches the end of a parallel region
spin for a while before it sleeps. With more busy threads than free cores (two processes, or DDP ranks on
one machine), the spinning thread burns the time slice its descheduled sibling needs, so a step slows far more
than the lost CPU share explains (1 s -> 12-20 s seen on 2 cores). Each process therefore takes its share of
the CPUs it may run on; an explicit OMP_NUM_THREADS always wins. See docs/performance.md.
"""

from __future__ import annotations

import os

import torch


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads(local_processes: int, cpus: int | None = None) -> int:
    """The share of `cpus` (default: usable ones) for one of `local_processes` processes, at least 1."""
    return max(1, (cpus or usable_cpus()) // max(1, local_processes))


def configure_threads(world: int) -> int:
    """Set torch's intra-op threads for this process unless OMP_NUM_THREADS says; returns the count in use.

    `world` is the number of processes; LOCAL_WORLD_SIZE (set by torchrun and accelerate) says how many of
    them share this machine.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    torch.set_num_threads(threads)
    return threads
