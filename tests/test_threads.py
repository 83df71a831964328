"""The compute-thread policy, on scripted CPU readings (no model, no timing)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from speckv.config import ModelConfig
from speckv.engine import threads as policy_module
from speckv.engine.threads import ThreadPolicy


class Clock:
    """Scripted readings: `now` seconds, CPU busy jiffies of our CPUs and of us."""

    def __init__(self, monkeypatch, cores: int) -> None:
        self.now, self.busy, self.own = 0.0, 0, 0
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the suite's own fixes it
        monkeypatch.setattr(policy_module, "available_cores", lambda: cores)
        monkeypatch.setattr(policy_module.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(policy_module, "_busy_jiffies", lambda cpus: self.busy)
        monkeypatch.setattr(policy_module, "_own_jiffies", lambda: self.own)

    def advance(self, seconds: float, ours: float, others: float) -> None:
        """`seconds` pass in which we use `ours` cores and other processes `others`."""
        hz = os.sysconf("SC_CLK_TCK")
        self.now += seconds
        self.own += round(ours * seconds * hz)
        self.busy += round((ours + others) * seconds * hz)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_automatic_policy_follows_the_cores_others_leave_free(monkeypatch, restore_threads):
    clock = Clock(monkeypatch, cores=4)
    policy = ThreadPolicy(0)
    assert policy.threads == 4 and torch.get_num_threads() == 4
    clock.advance(1.0, ours=4, others=0.1)  # background noise: keep every core
    policy.observe()
    assert policy.threads == 4
    clock.advance(1.0, ours=3, others=1.0)  # one busy neighbour: 3 threads
    policy.observe()
    assert policy.threads == 3 and torch.get_num_threads() == 3
    clock.advance(0.5, ours=3, others=3.0)  # within the window: no new look
    policy.observe()
    assert policy.threads == 3
    clock.advance(0.5, ours=1, others=3.0)  # now a window of others at 3+ cores
    policy.observe()
    assert policy.threads == 1
    clock.advance(1.0, ours=1, others=8.0)  # never below one
    policy.observe()
    assert policy.threads == 1
    clock.advance(1.0, ours=1, others=0.0)  # the neighbours are gone: all cores again
    policy.observe()
    assert policy.threads == 4 and policy.stats()["compute_thread_changes"] == 3


def test_a_fixed_count_never_changes_and_applies_on_the_stepping_thread(monkeypatch,
                                                                        restore_threads):
    clock = Clock(monkeypatch, cores=4)
    policy = ThreadPolicy(2)
    clock.advance(1.0, ours=2, others=4.0)
    policy.observe()
    assert policy.threads == 2 and torch.get_num_threads() == 2
    seen = []

    def step_elsewhere():  # OpenMP's thread count is per thread: the policy re-applies it
        torch.set_num_threads(3)
        policy.observe()
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=step_elsewhere)
    t.start()
    t.join()
    assert seen == [2]


def test_unreadable_proc_keeps_the_count(monkeypatch, restore_threads):
    clock = Clock(monkeypatch, cores=2)
    monkeypatch.setattr(policy_module, "_busy_jiffies", lambda cpus: None)
    policy = ThreadPolicy(0)
    clock.advance(2.0, ours=2, others=2)
    policy.observe()
    assert policy.threads == 2


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_threads_option_is_validated(bad):
    with pytest.raises(ValueError, match="threads must be an integer >= 0"):
        ModelConfig(threads=bad)


def test_omp_num_threads_fixes_an_automatic_count(monkeypatch, restore_threads):
    clock = Clock(monkeypatch, cores=4)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    policy = ThreadPolicy(0)
    clock.advance(1.0, ours=3, others=3.0)
    policy.observe()
    assert policy.fixed and policy.threads == 3 and torch.get_num_threads() == 3
    assert ThreadPolicy(2).threads == 2  # an explicit --threads wins
