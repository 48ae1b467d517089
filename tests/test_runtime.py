"""The entry points re-execute once with glibc malloc tunables (see paretoq_jax/runtime.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from paretoq_jax.runtime import MALLOC_TUNABLES

SCRIPT = """
import os
from paretoq_jax.runtime import reexec_with_malloc_tunables
print("start", flush=True)
reexec_with_malloc_tunables()
print(os.environ.get("GLIBC_TUNABLES"), os.getpid())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.parametrize("opt_out", [False, True])
def test_reexec_sets_tunables_once(tmp_path, opt_out):
    script = tmp_path / "entry.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PARETOQ_NO_REEXEC")}
    if opt_out:
        env["PARETOQ_NO_REEXEC"] = "1"
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, check=True
    )
    lines = proc.stdout.split("\n")
    value, _ = lines[-2].split()
    if opt_out:
        assert lines.count("start") == 1 and value == "None"
    else:  # ran twice (same pid: execve), the second time with the tunables set
        assert lines.count("start") == 2 and value == MALLOC_TUNABLES


def test_heap_guard_trims_only_when_resident_memory_grows(monkeypatch):
    from paretoq_jax import runtime

    rss = iter([1000, 1100, 5000, 1200, 1300])
    trims = []
    monkeypatch.setattr(runtime, "_rss_bytes", lambda: next(rss))
    monkeypatch.setattr(runtime, "release_free_memory", lambda: trims.append(1) or True)
    guard = runtime.HeapGuard(slack=0.25, floor=100)
    assert guard() is False  # baseline 1000
    assert guard() is False  # 1100 <= 1000 * 1.25 + 100
    assert guard() is True and trims == [1]  # 5000: trimmed, 1200 still resident
    assert guard.base == 1200
    assert guard() is False  # 1300 <= 1200 * 1.25 + 100
