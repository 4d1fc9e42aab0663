"""The command-line layer shared by every ``python -m`` entry point: argument groups, logging, model
loading and one bad-input policy.

Entry points: :mod:`mast3r_colmap.run` (``mast3r-colmap``), :mod:`mast3r_colmap.localization`,
:mod:`mast3r_colmap.evaluate` and :mod:`mast3r_colmap.pipelines.aachen`. Each makes its parser with
:func:`new_parser`, adds the groups it needs, and runs its body through :func:`run_cli`:

* model (:func:`add_model_arguments`, every tool that loads a network): ``--checkpoint``, ``--device``,
  ``--precision fp32|bf16|fp16``; :func:`load_network` resolves the device, maps the precision to the
  autocast dtype and loads the network;
* matcher resources (:func:`add_matcher_arguments`): ``--batch-size``, ``--cache-size``, ``--num-workers``,
  the :class:`~.matching.matcher.MatcherConfig` fields of :func:`matcher_overrides`;
* logging (:func:`add_logging_arguments`, every tool): ``-v/--verbose``, ``-q/--quiet``,
  ``--log-level LEVEL``, ``--no-progress``; :func:`setup_logging`;
* bad input (:func:`run_cli`): a ``ValueError`` (checkpoint errors included) or ``OSError`` ends in one
  logged message and exit code 2 (:data:`EXIT_BAD_INPUT`), the traceback only at DEBUG level
  (``--verbose``); Ctrl-C exits with 130.

Nothing here imports torch or the model package until a parser needs its defaults or a model is loaded.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Callable, Dict, Optional, Sequence

from .utils import configure_colmap_logging

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_NO_MODEL",
    "PRECISIONS",
    "add_logging_arguments",
    "add_matcher_arguments",
    "add_model_arguments",
    "exit_codes_help",
    "load_network",
    "matcher_overrides",
    "new_parser",
    "run_cli",
    "setup_logging",
]

#: Exit code of the command lines for bad input (missing files, unreadable images or checkpoints, ...).
EXIT_BAD_INPUT = 2
#: Exit code of a run whose mapper made no model (fewer than 2 registered images).
EXIT_NO_MODEL = 3
#: Exit code of a run stopped with Ctrl-C.
EXIT_INTERRUPTED = 130
#: ``--precision`` choices: the autocast dtype (by torch name) of the encoder and decoder.
PRECISIONS: Dict[str, Optional[str]] = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
#: ``--log-level`` choices.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def exit_codes_help(no_model: bool = False) -> str:
    """The ``exit codes:`` epilog of a command line (``no_model``: it can exit with :data:`EXIT_NO_MODEL`)."""
    lines = ["exit codes:", "  0    success",
             f"  {EXIT_BAD_INPUT}    bad input: missing or unreadable files, a bad option or device, an output folder",
             "       holding a model this tool did not write (one message, a traceback only with --verbose)"]
    if no_model:
        lines += [f"  {EXIT_NO_MODEL}    no model: the mapper registered fewer than 2 images (the log says how many "
                  "pairs", "       passed geometric verification)"]
    lines.append(f"  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)")
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the epilog (exit codes) as written."""


def new_parser(prog: str, description: str, no_model: bool = False) -> argparse.ArgumentParser:
    """An argument parser with defaults in its help and the exit codes as epilog (see :func:`exit_codes_help`)."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=exit_codes_help(no_model),
                                   formatter_class=_HelpFormatter)


# ---- argument groups ----------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--device`` and ``--precision`` (read by :func:`load_network`)."""
    from .model.checkpoint import DEFAULT_CHECKPOINT

    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                       help="official .pth file, hub folder (config.json + model.safetensors) or hub id")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                       help="encoder/decoder precision (heads always fp32); bf16/fp16 are meant for CUDA, "
                            "on a CPU they are fast only with native support (AMX)")


def add_matcher_arguments(parser: argparse.ArgumentParser) -> None:
    """The matcher's resource flags (read by :func:`matcher_overrides`); unset flags keep the preset's value."""
    from .matching.matcher import MatcherConfig

    group = parser.add_argument_group("matcher resources")
    group.add_argument("--batch-size", type=int, default=None,
                       help=f"pairs per decoder batch (default {MatcherConfig.batch_size})")
    group.add_argument("--cache-size", type=int, default=None,
                       help=f"image encodings kept in memory (default {MatcherConfig.cache_size}; 3 MiB each for "
                            "ViT-L at 512x384)")
    group.add_argument("--num-workers", type=int, default=None,
                       help=f"threads decoding the images of upcoming pairs (default {MatcherConfig.num_workers}; "
                            "0: decode inline)")


def matcher_overrides(args: argparse.Namespace) -> Dict[str, int]:
    """The :class:`~.matching.matcher.MatcherConfig` fields set by :func:`add_matcher_arguments` flags."""
    return {key: getattr(args, key) for key in ("batch_size", "cache_size", "num_workers")
            if getattr(args, key, None) is not None}


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose``, ``-q/--quiet``, ``--log-level`` (one ``args.log_level``) and ``--no-progress``."""
    group = parser.add_argument_group("logging")
    level = group.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="DEBUG",
                       default=argparse.SUPPRESS, help="debug messages, COLMAP's own INFO lines and tracebacks "
                                                       "of bad input (--log-level DEBUG)")
    level.add_argument("-q", "--quiet", dest="log_level", action="store_const", const="WARNING",
                       default=argparse.SUPPRESS, help="warnings and errors only (--log-level WARNING)")
    level.add_argument("--log-level", dest="log_level", type=str.upper, choices=LOG_LEVELS, default="INFO",
                       help="the least severe messages shown")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def setup_logging(level: int | str = logging.INFO) -> None:
    """Logging of the command lines (a no-op where the root logger already has handlers), then COLMAP's
    (see :func:`~.utils.configure_colmap_logging`: its INFO lines only at DEBUG level)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    configure_colmap_logging()


# ---- model ----------------------------------------------------------------------------------------


def load_network(args: argparse.Namespace, device: Any = None) -> Any:
    """The network of ``--checkpoint`` on ``device`` (default ``--device``, see
    :func:`~.model.checkpoint.resolve_device`), autocast to ``--precision``."""
    import torch

    from .model import checkpoint  # looked up here: torch and the network only when a model is loaded

    device = checkpoint.resolve_device(args.device) if device is None else device
    dtype = PRECISIONS[getattr(args, "precision", "fp32")]
    return checkpoint.load_model(args.checkpoint, device=device,
                                 amp_dtype=None if dtype is None else getattr(torch, dtype))


# ---- bad input ------------------------------------------------------------------------------------


def run_cli(run: Callable[[Any], int], args: Any, interrupted_hint: str = "") -> int:
    """Run a command line's body: bad input (``ValueError``, checkpoint errors included, and ``OSError``)
    is logged as one message with exit code 2, its traceback only at DEBUG level (``--verbose``); Ctrl-C
    exits with 130."""
    log = logging.getLogger("mast3r_colmap")
    try:
        return run(args)
    except KeyboardInterrupt:
        log.error("interrupted%s", f"; {interrupted_hint}" if interrupted_hint else "")
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as exc:
        log.debug("details", exc_info=True)
        log.error("%s", exc)
        return EXIT_BAD_INPUT


def main(parser: argparse.ArgumentParser, run: Callable[[Any], int], argv: Optional[Sequence[Any]] = None,
         interrupted_hint: str = "") -> int:
    """The whole of a command line's ``main``: parse ``argv`` (items may be paths), set up logging from the
    shared flags, and run the body under :func:`run_cli`'s bad-input policy."""
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    setup_logging(args.log_level)
    return run_cli(run, args, interrupted_hint)
