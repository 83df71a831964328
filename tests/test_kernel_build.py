"""The CPU kernels' build: a killed build, a stale lock or a build in progress elsewhere
never makes a run hang."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from speckv.kv.cpu_kernels import build_directory, load_cpu_kernels

LOAD = ("import torch; from speckv.kv.cpu_kernels import load_cpu_kernels; "
        "print(load_cpu_kernels().__file__)")


def run_python(code: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_a_stale_torch_lock_beside_a_finished_build_is_ignored(tmp_path, monkeypatch):
    built = build_directory()
    load_cpu_kernels()  # built by `make setup` (or now)
    monkeypatch.setenv("SPECKV_KERNEL_DIR", str(tmp_path))
    copy = build_directory()
    shutil.copytree(built, copy)
    (copy / "lock").write_text("")  # what a killed torch build leaves behind
    out = run_python(LOAD, {"SPECKV_KERNEL_DIR": str(tmp_path)}, timeout=120)
    assert out.returncode == 0 and str(copy) in out.stdout, out.stderr


def test_a_build_held_by_another_process_is_waited_for_with_a_message_then_refused(tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("SPECKV_KERNEL_DIR", str(tmp_path))
    directory = build_directory()
    directory.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); f.write('pid holder'); "
         "f.flush(); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
         str(directory.with_suffix(".lock"))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="another process .* has been building"):
            load_cpu_kernels(wait=1.0)
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_first_build_killed_halfway_does_not_hang_the_next_run(tmp_path):
    env = {"SPECKV_KERNEL_DIR": str(tmp_path)}
    first = subprocess.Popen([sys.executable, "-c", LOAD], env={**os.environ, **env},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("*/build.ninja")):  # the compiler is running now
        assert time.monotonic() < deadline and first.poll() is None, first.stderr.read()
        time.sleep(0.2)
    time.sleep(2)
    os.killpg(first.pid, signal.SIGKILL)  # Ctrl-C or a timeout, and the compilers with it
    first.wait()
    second = run_python(LOAD, env, timeout=600)  # rebuilds; waits on nothing
    assert second.returncode == 0, second.stderr
    assert "building the CPU kernels" in second.stderr
    assert str(tmp_path) in second.stdout
