"""cvxtune.memory: processes that run backbones reuse freed activation memory instead of
faulting fresh pages in at every batch (glibc only)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cvxtune.memory import REEXEC_MARK, TUNABLES, is_glibc, tuned_environ

ROOT = Path(__file__).resolve().parents[2]
glibc_only = pytest.mark.skipif(not is_glibc(), reason="malloc settings are glibc's")

# Allocates and frees blocks the sizes of a forward's activations, over and over, in the main
# thread and in two other threads (each with its own arena by default, as extraction streams and
# serving runners), and prints the minor page faults of each thread after the first rounds: what
# a batch costs once warm.
PATTERN = """
import json, resource, sys, threading
import numpy as np
MB = 1 << 20
sizes = [int(float(s) * MB) for s in sys.argv[1].split(",")]
if sys.argv[2] == "mallopt":
    from cvxtune.memory import keep_freed_memory
    assert keep_freed_memory()
def steady_faults(rounds=12, warm=4):
    faults = []
    for _ in range(rounds):
        f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        held = []
        for size in sizes:
            block = np.empty(size, dtype=np.uint8)
            block[::4096] = 1  # touch every page, as a forward writes its activations
            held.append(block)
            if len(held) > 2:
                held.pop(0)
        del held
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)
    return sum(faults[warm:])
out = {"main": steady_faults()}
def run(k):
    out[f"thread{k}"] = steady_faults()
for k in range(2):  # one after another: together, how their first rounds interleave decides
    t = threading.Thread(target=run, args=(k,))  # how far a shared heap grows, run to run
    t.start()
    t.join()
print(json.dumps(out))
"""
# tf_efficientnet_lite0's activations at batch 4 (under 32 MiB) and at batch 16 (above 64 MiB).
SMALL = "6,19,19,6,12,3,1,0.5"
LARGE = "6,80,80,20,40,3"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"GLIBC_TUNABLES", REEXEC_MARK}}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _faults(sizes: str, how: str, env: dict[str, str]) -> dict[str, int]:
    import json

    out = subprocess.run(
        [sys.executable, "-c", PATTERN, sizes, how],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout)


def test_tuned_environ_adds_the_settings_and_keeps_those_already_set() -> None:
    env = tuned_environ({"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert dict(item.split("=") for item in env["GLIBC_TUNABLES"].split(":")) == {
        k: str(v) for k, v in TUNABLES.items()
    }
    own = tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.cpu.x86_rep_movsb=1"})
    items = own["GLIBC_TUNABLES"].split(":")
    assert items[:2] == ["glibc.malloc.arena_max=4", "glibc.cpu.x86_rep_movsb=1"]
    assert sorted(items[2:]) == sorted(
        f"{k}={v}" for k, v in TUNABLES.items() if k != "glibc.malloc.arena_max"
    )
    assert tuned_environ(env) == env  # nothing to add the second time


@glibc_only
@pytest.mark.parametrize("sizes", [SMALL, LARGE])
def test_a_process_started_with_the_settings_reuses_freed_memory(sizes: str) -> None:
    tuned = _faults(sizes, "-", tuned_environ(_env()))
    assert max(tuned.values()) < 100, tuned


@glibc_only
def test_keep_freed_memory_at_run_time_covers_blocks_up_to_32_mib() -> None:
    faults = _faults(SMALL, "mallopt", _env())
    assert max(faults.values()) < 100, faults


@glibc_only
def test_the_pattern_faults_without_the_settings() -> None:
    """What the two tests above guard against, on this machine's glibc: each warm round faults
    its blocks in again (a block of 80 MiB is 20480 pages)."""
    faults = _faults(LARGE, "-", _env())
    assert max(faults.values()) > 1000, faults


@glibc_only
def test_heavy_commands_start_again_with_the_settings() -> None:
    """`cvxtune embed` (as serve and worker) re-executes itself once with the settings; the
    program below prints what it sees each time it starts, then runs the command's --help."""
    code = (
        "import os, sys\n"
        "print(repr((os.environ.get('GLIBC_TUNABLES'), os.environ.get('CVXTUNE_MALLOC_TUNED'))),"
        " flush=True)\n"
        "sys.argv = ['cvxtune', 'embed', '--help']\n"
        "from cvxtune.cli import main\n"
        "raise SystemExit(main())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    first, second = ast.literal_eval(lines[0]), ast.literal_eval(lines[1])
    assert first == (None, None)
    assert second == (tuned_environ({})["GLIBC_TUNABLES"], "1")
    assert "--backbone" in out.stdout  # then the command itself ran, once
    assert sum(line.startswith("(") for line in lines) == 2


def test_the_docker_image_sets_the_same_settings() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"ENV GLIBC_TUNABLES={tuned_environ({})['GLIBC_TUNABLES']}\n" in dockerfile
