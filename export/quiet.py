"""Keep third-party chatter off the console: by default a CLI prints our progress bars and our lines only.

Called first thing by each CLI's main (before transformers / diffusers / torch.onnx are imported, so
their verbosity settings take); `-v` leaves everything as the libraries print it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # the last: weight loading/saving bars of transformers
LIBRARIES = ("torch", "onnxscript", "onnx_ir", "onnxruntime", "diffusers", "transformers", "huggingface_hub",
             "polygraphy", "onnx_graphsurgeon", "accelerate")


def quiet(verbose: bool = False) -> None:
    """Silence the libraries' warnings and info logs (errors still show); no-op when `verbose`."""
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    # torch._logging sets its loggers' levels when torch is imported: import it first, then set ours
    import torch  # noqa: F401

    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    _filter_warnings()
    warnings.formatwarning = _one_line  # ours: "warning: ..." instead of file, line and source


@contextlib.contextmanager
def quieted(verbose: bool = False) -> Iterator[None]:
    """`quiet` for one block of library work (the Python API's build): the libraries' logger levels and the
    warning filters are put back after it, so a program that calls us keeps its own settings."""
    if verbose:
        yield
        return
    import torch  # noqa: F401  (its logging sets levels on import: first, then ours)

    loggers = [logging.getLogger(name) for name in LIBRARIES]
    levels = [logger.level for logger in loggers]
    env = {name: os.environ.get(name) for name in QUIET_ENV}  # read by transformers / diffusers when imported
    os.environ.update({name: value for name, value in QUIET_ENV.items() if env[name] is None})
    with warnings.catch_warnings():
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        _filter_warnings()
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
            for name, value in env.items():
                if value is None:
                    os.environ.pop(name, None)


def _filter_warnings() -> None:
    """Ignore the deprecation and future warnings, and the libraries' user warnings."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    pattern = rf"({'|'.join(LIBRARIES + ('copyreg',))})(\.|$)"
    warnings.filterwarnings("ignore", category=UserWarning, module=pattern)


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def add_verbose_flag(parser) -> None:
    """The `-v/--verbose` flag every CLI shows in --help (read early by `quiet_cli`)."""
    parser.add_argument("-v", "--verbose", action="store_true", default=False,
                        help="show third-party warnings and logs too")


def quiet_cli(argv: list[str] | None) -> bool:
    """First thing in a CLI's main: quiet the libraries unless -v/--verbose is among the arguments (returned)."""
    import argparse
    import sys

    early = argparse.ArgumentParser(add_help=False)
    add_verbose_flag(early)
    known, _ = early.parse_known_args(sys.argv[1:] if argv is None else argv)
    quiet(known.verbose)
    return known.verbose
