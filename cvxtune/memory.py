"""Keep freed memory in the process, so that a forward does not page-fault its activations in
again at every batch.

A backbone's forward allocates and frees the same activation buffers, megabytes to hundreds of
megabytes, at every batch. glibc's malloc serves a block above its mmap threshold (128 KiB at
start, raised by an adaptive rule to at most 32 MiB) with a fresh mapping, gives the top of a heap
back to the system above its trim threshold, and gives each thread an arena whose heaps hold at
most 64 MiB, so a large block allocated in a thread (extraction streams, serving runners) is a
fresh mapping whatever the thresholds. Each fresh mapping is faulted in page by page: on this
project's 2-core CPU VM the extraction pipeline of tf_efficientnet_lite0 at batch 32 took 5600
minor page faults per image and ran at 81-85 images/s; with the settings below, 19 faults per
image and 140-142 images/s (bench/README.md, "malloc keeps freed memory").

glibc reads these settings once, when a process starts (the environment variable
GLIBC_TUNABLES), so `reexec_tuned` starts the command again with them; the `cvxtune` commands
that run backbones or fit heads (embed, serve, worker) do this, and the Docker image sets the
variable. A process that did not start with them (a notebook importing workers) gets what can
still be changed at run time from `keep_freed_memory`: thresholds of 32 MiB, no single arena.

The cost: a resident size that does not shrink after a peak (up to 1 GiB kept free), which a
process that runs the same batches again reuses anyway. A setting already in GLIBC_TUNABLES is
kept as it is, so a deployment can choose its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Mapping, Sequence

TUNABLES: dict[str, int] = {
    "glibc.malloc.mmap_threshold": 1 << 30,  # blocks below 1 GiB come from a heap
    "glibc.malloc.trim_threshold": 1 << 30,  # and stay there when freed
    "glibc.malloc.arena_max": 1,  # one heap for all threads, which can grow past 64 MiB
}
# Marks a process started again by `reexec_tuned`, so it never loops.
REEXEC_MARK = "CVXTUNE_MALLOC_TUNED"

# mallopt parameters (malloc.h) and the largest mmap threshold mallopt accepts on 64-bit.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOPT_MMAP_MAX = 32 << 20

_lock = threading.Lock()
_kept: bool | None = None


def is_glibc() -> bool:
    """Whether this process runs on glibc (the C library it has loaded, not what the
    interpreter's file was linked against)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):  # a libc that does not know the name (musl)
        return False


def _tunables(environ: Mapping[str, str]) -> list[str]:
    """The name=value items of GLIBC_TUNABLES in `environ`, in order."""
    return [item for item in environ.get("GLIBC_TUNABLES", "").split(":") if item]


def _names(items: list[str]) -> set[str]:
    return {item.split("=", 1)[0] for item in items}


def tuned_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with TUNABLES added to GLIBC_TUNABLES, keeping any of them already set there."""
    current = _tunables(environ)
    have = _names(current)
    extra = [f"{k}={v}" for k, v in TUNABLES.items() if k not in have]
    env = dict(environ)
    if extra:
        env["GLIBC_TUNABLES"] = ":".join([*current, *extra])
    return env


def reexec_tuned(argv: Sequence[str] | None = None) -> None:
    """Start this command again in place (same pid, same open files) with TUNABLES, unless it
    already has them, was started again already, or this is not glibc. Call it first thing,
    before threads start."""
    args = list(sys.orig_argv if argv is None else argv)
    if not is_glibc() or os.environ.get(REEXEC_MARK) == "1":
        return
    env = tuned_environ(os.environ)
    if env == dict(os.environ) or not sys.executable or not args:
        return  # nothing to add, or no interpreter to start again (embedded or frozen Python)
    env[REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, env)


def keep_freed_memory() -> bool:
    """At run time, what mallopt can still set (once per process): thresholds of 32 MiB.
    Returns whether the process keeps freed memory, either way (False off glibc)."""
    global _kept
    with _lock:
        if _kept is None:
            _kept = _mallopt()
        return _kept


def _mallopt() -> bool:
    if not is_glibc():
        return False
    if "glibc.malloc.mmap_threshold" in _names(_tunables(os.environ)):
        return True  # set at start-up, beyond what mallopt may set: do not lower it
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Either setting turns off glibc's adaptive thresholds; the mmap threshold must be set too,
    # or every block above 128 KiB would be a fresh mapping (measured: 2x slower forwards).
    ok = mallopt(_M_MMAP_THRESHOLD, _MALLOPT_MMAP_MAX) == 1
    return ok and mallopt(_M_TRIM_THRESHOLD, TUNABLES["glibc.malloc.trim_threshold"]) == 1
