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
