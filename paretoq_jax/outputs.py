"""Output paths that never destroy what the user has (see ``docs/cli.md``).

Every command that writes (``export``, ``eval --out``, ``report``, ``sweep``, ``quickstart``)
checks its output path with :func:`check_output` *before any work starts*, then writes through
:func:`atomic_output` (a temporary name beside the target, renamed into place when complete).

The rules, whatever ``--force`` says:

- never into, over or above a training run directory (a folder holding ``config.yaml``,
  ``checkpoints/`` or ``metrics.jsonl``), nor into, over or above anything the command reads
  (the checkpoint being exported, the model being evaluated);
- an existing path is replaced only when it is an earlier output of the same kind, recognised
  by its marker (a ``.paretoq-output.json`` file in an output folder; the ``output_kind`` key
  of a results JSON; the ``paretoq_jax.output`` key of a GGUF file), and only with ``--force``
  unless the kind is derived data that is always regenerated (reports);
- an existing empty folder may be used; any other existing path is refused;
- the parent folder must be creatable and writable, and the path must be of the right type
  (a folder for folder outputs, a file for file outputs).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from paretoq_jax import __version__
from paretoq_jax.errors import OutputError

__all__ = [
    "MARKER",
    "OutputError",
    "atomic_output",
    "atomic_write_text",
    "check_output",
    "check_run_dir",
    "find_run_dir",
    "is_run_dir",
    "marker_text",
    "output_kind",
    "TEXT_MARKER",
]

MARKER = ".paretoq-output.json"
GGUF_KIND_KEY = "paretoq_jax.output"
JSON_KIND_KEY = "output_kind"
RUN_DIR_MARKERS = ("config.yaml", "checkpoints", "metrics.jsonl")
# kinds whose earlier output is replaced without --force (derived data, regenerated at will)
REGENERATED = frozenset({"report", "hlo", "scale-page"})
# first line of a generated text page (markdown): names its kind, as a folder's marker does
TEXT_MARKER = "<!-- paretoq_jax output: {kind} -->"
_TEXT_KIND = re.compile(rb"<!-- paretoq_jax output: ([\w-]+) -->")


def is_run_dir(path: str | Path) -> bool:
    """A training run directory: it holds ``config.yaml``, ``checkpoints/`` or
    ``metrics.jsonl`` (what ``python -m paretoq_jax.train`` writes first)."""
    p = Path(path)
    return p.is_dir() and any((p / m).exists() for m in RUN_DIR_MARKERS)


def find_run_dir(path: str | Path) -> Path | None:
    """``path`` itself or its nearest ancestor that is a training run directory, else None."""
    p = _abs(path)
    for q in (p, *p.parents):
        if is_run_dir(q):
            return q
    return None


def _abs(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()  # absolute, symbolic links resolved


def _within(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies below it."""
    return a == b or b in a.parents


def output_kind(path: str | Path) -> str | None:
    """The kind of paretoq_jax output at ``path`` (from its marker), else None."""
    p = Path(path)
    if p.is_dir():
        try:
            return json.loads((p / MARKER).read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            return _legacy_folder_kind(p)
    if not p.is_file():
        return None
    try:
        with open(p, "rb") as f:
            head = f.read(64)
        if head[:2] == b"\x1f\x8b":  # gzip: an HLO dump kept by `plan --hlo FILE.gz`?
            with gzip.open(p, "rb") as f:
                head = f.read(64)
    except (OSError, EOFError):
        return None
    if head.startswith(b"HloModule "):  # optimized HLO text (`plan --hlo`)
        return "hlo"
    text_kind = _TEXT_KIND.match(head)
    if text_kind:
        return text_kind[1].decode()
    if head.startswith(b"# Pod scale, planned on a CPU"):  # plan.scale's page before the marker
        return "scale-page"
    if head[:4] == b"GGUF":
        return _gguf_kind(p)
    if head[:1] == b"{":
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        return data.get(JSON_KIND_KEY) if isinstance(data, dict) else None
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _legacy_folder_kind(p: Path) -> str | None:
    """Outputs written before markers existed, recognised by their own signatures: a sweep
    (``cells.json``), a packed export (``quant_config.json`` of the packed format), an HF export
    (``config.json`` with this project's ``paretoq`` section)."""
    if (p / "cells.json").is_file():
        return "sweep"
    names = {e.name for e in p.iterdir()}
    if "report.md" in names and "cells" not in names:  # a report: its page beside its rows
        if "results.json" in names or all(n == "report.md" or n.endswith(".png") for n in names):
            return "report"
    if _read_json(p / "quant_config.json").get("format") == "paretoq-packed":
        return "export-packed"
    if "paretoq" in _read_json(p / "config.json") and (p / "model.safetensors").is_file():
        return "export-hf"
    return None


def _gguf_kind(path: Path) -> str | None:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.get_field(GGUF_KIND_KEY)
        if field is not None:
            return str(field.contents())
        name = reader.get_field("general.name")  # exports before the marker: "paretoq-ARCH"
        if name is not None and str(name.contents()).startswith("paretoq-"):
            return "export-gguf"
    except Exception:  # not readable as GGUF: not ours
        return None
    return None


def _run_dirs_below(path: Path, limit: int = 10_000) -> Path | None:
    """The first training run directory at or below ``path`` (walk bounded by ``limit`` dirs)."""
    for i, (root, dirs, _files) in enumerate(os.walk(path)):
        if is_run_dir(root):
            return Path(root)
        if i >= limit:
            break
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # skip temporaries and markers
    return None


def check_output(
    out: str | Path,
    kind: str,
    *,
    directory: bool,
    force: bool = False,
    reads: Sequence[str | Path] = (),
    owned_run: str | Path | None = None,
    flag: str = "--out",
    resume: bool = False,
) -> Path:
    """Check that ``out`` may receive an output of ``kind``; returns it as an absolute path.

    ``directory``: the output is a folder (else a file). ``reads``: paths the command reads
    (never written into, over or above). ``owned_run``: a run directory this command itself
    trains into (the quickstart), below which it may write. ``resume``: an earlier output of
    the same kind is continued in place, not replaced (a sweep folder). Raises
    :class:`OutputError`.
    """
    p = _abs(out)
    what = f"{flag} {out}"
    for r in reads:
        r = _abs(r)
        if _within(p, r) or _within(r, p):
            rel = "is" if p == r else ("is inside" if _within(p, r) else "contains")
            raise OutputError(
                f"{what} {rel} {r}, which this command reads: writing there could destroy it. "
                "Choose an output path outside it."
            )
    run = find_run_dir(p)
    owned = _abs(owned_run) if owned_run is not None else None
    if run is not None and not (owned is not None and run == owned and p != owned):
        where = "is" if run == p else "is inside"
        raise OutputError(
            f"{what} {where} the training run directory {run} (it holds "
            f"{', '.join(m for m in RUN_DIR_MARKERS if (run / m).exists())}); outputs never go "
            f"into or over a run. Choose a path outside it, e.g. {run.parent / (run.name + '-' + kind)}."
        )
    if p.exists() or p.is_symlink():
        _check_existing(p, kind, directory=directory, force=force, what=what, resume=resume)
    _check_parent_writable(p, what)
    return p


def _check_existing(
    p: Path, kind: str, *, directory: bool, force: bool, what: str, resume: bool
) -> None:
    if p.is_dir():
        if not directory:
            raise OutputError(
                f"{what} is a directory; give a file path, e.g. {p / ('results' + _suffix(kind))}"
            )
        if not any(p.iterdir()):
            return  # an empty folder: nothing to lose
    elif directory:
        raise OutputError(f"{what} exists and is not a directory; choose a new folder path")
    found = output_kind(p)
    if found != kind:
        mine = f"an earlier '{found}' output" if found else "not an output of paretoq_jax"
        raise OutputError(
            f"{what} already exists and is {mine} (no '{kind}' marker); it is left alone, "
            "whatever --force says: --force only replaces an earlier output of the same kind. "
            "Choose another path, or move it away yourself."
        )
    if resume:
        return
    if p.is_dir():
        inner = _run_dirs_below(p)
        if inner is not None:
            raise OutputError(
                f"{what} contains the training run directory {inner}; it is not replaced. "
                "Move the run out of it or choose another output path."
            )
    if not force and kind not in REGENERATED:
        raise OutputError(
            f"{what} already exists (an earlier '{kind}' output): pass --force to replace it"
        )


def _suffix(kind: str) -> str:
    return ".gguf" if "gguf" in kind else ".json"


def _check_parent_writable(p: Path, what: str) -> None:
    q = p.parent
    while not q.exists():
        if q.is_symlink():  # a dangling link: mkdir would fail late
            raise OutputError(f"{what}: {q} is a broken symbolic link")
        q = q.parent
    if not q.is_dir():
        raise OutputError(f"{what}: {q} is a file, so the folder {p.parent} cannot be created")
    if not os.access(q, os.W_OK | os.X_OK):
        raise OutputError(f"{what}: no permission to write in {q}")


def marker_text(kind: str, extra: dict | None = None) -> str:
    data = {"kind": kind, "tool": f"paretoq_jax {__version__}", "created": time.time()}
    return json.dumps({**data, **(extra or {})}, indent=1) + "\n"


@contextlib.contextmanager
def atomic_output(
    out: str | Path,
    kind: str,
    *,
    directory: bool,
    force: bool = False,
    reads: Sequence[str | Path] = (),
    owned_run: str | Path | None = None,
    marker: dict | None = None,
    flag: str = "--out",
) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``out``; when the block succeeds, mark it as an
    output of ``kind`` (folders) and rename it to ``out``, replacing an earlier output only as
    :func:`check_output` allows (checked again just before the rename). On failure the
    temporary path is removed and ``out`` is left as it was."""
    p = check_output(
        out, kind, directory=directory, force=force, reads=reads, owned_run=owned_run, flag=flag
    )
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.tmp-", dir=p.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is a normal folder
    target = tmp if directory else tmp / p.name
    try:
        yield target
        if directory:
            (target / MARKER).write_text(marker_text(kind, marker))
        check_output(
            out, kind, directory=directory, force=force, reads=reads, owned_run=owned_run, flag=flag
        )  # anything changed meanwhile?
        if p.exists() and not (p.is_dir() and not any(p.iterdir())):
            old = p.parent / f".{p.name}.old-{os.getpid()}"
            os.replace(p, old)
            os.replace(target, p)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            if p.is_dir():
                p.rmdir()  # an empty folder: replaced by the complete output
            os.replace(target, p)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it private; results are normal files
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_run_dir(run_dir: str | Path) -> Path:
    """Check that training may write into ``run_dir``: it is new, empty (dotfiles such as a
    sweep's lock aside) or a training run directory, and it does not lie inside another run.
    Raises :class:`OutputError`."""
    p = _abs(run_dir)
    outer = find_run_dir(p.parent)
    if outer is not None:
        raise OutputError(
            f"run_dir {run_dir} is inside the training run directory {outer}; a run never goes "
            "inside another one. Choose a run_dir outside it."
        )
    if p.exists() and not p.is_dir():
        raise OutputError(f"run_dir {run_dir} exists and is not a directory; choose a folder path")
    if p.is_dir() and not is_run_dir(p):
        found = output_kind(p)
        others = sorted(e.name for e in p.iterdir() if not e.name.startswith("."))
        if others or found:
            what = f"an earlier '{found}' output" if found else f"holds {', '.join(others[:5])}"
            raise OutputError(
                f"run_dir {run_dir} is not a training run directory and is not empty ({what}); "
                "training writes checkpoints and config.yaml there and never mixes them into "
                "other files. Choose a new or empty run_dir (or the run directory to resume)."
            )
    _check_parent_writable(p, f"run_dir {run_dir}")
    return p
