"""Keep third-party chatter off the console: by default a CLI prints our progress bars and our lines only.

Called first thing by each CLI's main (before transformers / diffusers / torch.onnx are imported, so
their verbosity settings take); `-v` leaves everything as the libraries print it.
"""
from __future__ import annotations

import logging
import os
import warnings

LIBRARIES = ("torch", "onnxscript", "onnx_ir", "onnxruntime", "diffusers", "transformers", "huggingface_hub",
             "polygraphy", "onnx_graphsurgeon", "accelerate")


def quiet(verbose: bool = False) -> None:
    """Silence the libraries' warnings and info logs (errors still show); no-op when `verbose`."""
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # weight loading/saving bars of transformers
    # torch._logging sets its loggers' levels when torch is imported: import it first, then set ours
    import torch  # noqa: F401

    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    pattern = rf"({'|'.join(LIBRARIES + ('copyreg',))})(\.|$)"
    warnings.filterwarnings("ignore", category=UserWarning, module=pattern)
    warnings.formatwarning = _one_line  # ours: "warning: ..." instead of file, line and source


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def add_verbose_flag(parser) -> None:
    """The `-v/--verbose` flag every CLI shows in --help (read early by `quiet_cli`)."""
    parser.add_argument("-v", "--verbose", action="store_true", default=False,
                        help="show third-party warnings and logs too")


def quiet_cli(argv: list[str] | None) -> None:
    """First thing in a CLI's main: quiet the libraries unless -v/--verbose is among the arguments."""
    import argparse
    import sys

    early = argparse.ArgumentParser(add_help=False)
    add_verbose_flag(early)
    known, _ = early.parse_known_args(sys.argv[1:] if argv is None else argv)
    quiet(known.verbose)
