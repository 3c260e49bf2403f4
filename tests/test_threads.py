"""The thread policy: each local process takes its share of the usable CPUs; OMP_NUM_THREADS wins."""

import torch

from gpg_vl.threads import configure_threads, default_threads


def test_share_of_the_cpus_per_local_process():
    assert default_threads(1, cpus=2) == 2
    assert default_threads(2, cpus=2) == 1  # two DDP ranks on 2 cores: one thread each, nobody spins
    assert default_threads(4, cpus=2) == 1  # never zero
    assert default_threads(2, cpus=16) == 8


def test_explicit_setting_wins_and_local_world_size_counts(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert configure_threads(world=1) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")  # more local processes than CPUs
        assert configure_threads(world=128) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
