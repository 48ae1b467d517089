"""The project's error types: every mistake a user can fix raises a :class:`ParetoQError`.

Each command line tool (``train``, ``eval``, ``export``, ``generate``, ``sweep``, ``report``,
``quickstart``, ...) runs under :func:`paretoq_jax.cli.run_cli`, which prints a ``ParetoQError``
as ``error: <message>`` (the message says what is wrong and how to fix it) and exits with the
error's ``exit_code``, without a traceback. Library users catch ``ParetoQError`` to tell bad
input apart from bugs. The exit codes are listed in ``docs/cli.md``.

This module imports nothing from the package, so every layer can use it.
"""

from __future__ import annotations

__all__ = ["ParetoQError", "OutputError", "InputError", "EXIT_ERROR", "EXIT_INTERNAL"]

EXIT_ERROR = 2  # bad input or configuration (argparse uses 2 as well)
EXIT_INTERNAL = 1  # an unexpected exception: a bug, or an input no check caught yet


class ParetoQError(Exception):
    """Base class of the errors a user can fix; ``exit_code`` is the CLIs' exit status."""

    exit_code: int = EXIT_ERROR


class InputError(ParetoQError, ValueError):
    """An input file or folder that is missing, empty, damaged or of the wrong kind."""


class OutputError(ParetoQError, ValueError):
    """An output path that would overwrite or delete something the command does not own."""
