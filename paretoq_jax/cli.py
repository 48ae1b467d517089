"""One error boundary for every command line tool.

``sys.exit(run_cli(main))`` runs ``main(argv)`` and turns the exceptions a user can cause into
one line on stderr and an exit status, never a traceback:

- :class:`~paretoq_jax.errors.ParetoQError` (bad config, corpus, checkpoint, output path, ...):
  ``error: <message>``, exit ``err.exit_code`` (2 unless the class says otherwise);
- ``OSError`` (a missing file, a permission, a full disk): ``error: <what> (<path>)``, exit 2;
- a plain ``ValueError`` (the library's checks of a value the user gave): ``error: <message>``,
  exit 2;
- ``KeyboardInterrupt``: ``interrupted``, exit 130;
- anything else is a bug or an input nothing checked yet: ``error: <Type>: <message>`` and a hint
  to rerun with ``--debug``, exit 1.

``--debug`` (anywhere on the command line, removed before ``main`` sees it) or
``PARETOQ_DEBUG=1`` re-raises instead, so the traceback is shown.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from paretoq_jax.errors import EXIT_ERROR, EXIT_INTERNAL, ParetoQError

__all__ = ["run_cli", "debug_enabled", "EXIT_SIGNAL_BASE"]

EXIT_SIGNAL_BASE = 128  # a run stopped by signal N exits 128 + N (SIGINT 130, SIGTERM 143)


def debug_enabled(argv: Sequence[str] | None = None) -> bool:
    """``--debug`` on the command line or ``PARETOQ_DEBUG`` set to a true value."""
    args = sys.argv[1:] if argv is None else argv
    env = os.environ.get("PARETOQ_DEBUG", "").strip().lower()
    return "--debug" in args or env not in ("", "0", "false", "no")


def _oserror_message(e: OSError) -> str:
    what = e.strerror or str(e)
    paths = [p for p in (e.filename, e.filename2) if p is not None]
    return f"{what} ({' -> '.join(map(str, paths))})" if paths else what


def run_cli(
    main: Callable[[list[str] | None], int | None], argv: Sequence[str] | None = None
) -> int:
    """Run ``main(argv)`` under the error boundary; returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(args)
    args = [a for a in args if a != "--debug"]
    try:
        return int(main(args) or 0)
    except SystemExit:
        raise  # argparse's own usage errors (exit 2) and explicit exits
    except BaseException as e:
        if debug:
            raise
        return _report(e)


def _report(e: BaseException) -> int:
    err = sys.stderr
    if isinstance(e, KeyboardInterrupt):
        print("interrupted", file=err)
        return EXIT_SIGNAL_BASE + 2
    if isinstance(e, ParetoQError):
        print(f"error: {e}", file=err)
        return e.exit_code
    if isinstance(e, OSError):
        print(f"error: {_oserror_message(e)}", file=err)
        return EXIT_ERROR
    if type(e) is ValueError:  # the library's checks of values a user gave (not subclasses)
        print(f"error: {e}", file=err)
        return EXIT_ERROR
    print(f"error: {type(e).__name__}: {e}", file=err)
    print(
        "(unexpected error: rerun with --debug or PARETOQ_DEBUG=1 to see the traceback; "
        "if the input looks right, please report it)",
        file=err,
    )
    return EXIT_INTERNAL
