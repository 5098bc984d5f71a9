"""User-facing errors.

Every command-line entry point catches :class:`UserError`, prints its message as one line
(``error: <message>``) and exits with code 2, without a traceback.  Raise it for anything the
user can fix: a missing file, a wrong key, a wrong frame count, a checkpoint that does not fit.
"""
from __future__ import annotations

import functools
import importlib
import re
import sys


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def run_cli(main):
    """Decorator for CLI ``main`` functions: ``UserError`` becomes one line on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


# import name -> distribution name, where they differ
_DISTRIBUTIONS = {"PIL": "pillow", "sat": "SwissArmyTransformer", "imageio_ffmpeg": "imageio-ffmpeg"}


def _requirement(module: str) -> str:
    """The requirement of this project for the package that provides ``module`` (e.g. ``diffusers==0.42.1``),
    from the installed metadata of sat-cogvideo, else the bare distribution name."""
    from importlib import metadata

    dist = _DISTRIBUTIONS.get(module, module)
    try:
        requires = metadata.requires("sat-cogvideo") or []
    except metadata.PackageNotFoundError:
        requires = []
    for req in requires:
        name = re.split(r"[\s;<>=!~\[]", req, maxsplit=1)[0]
        if name.lower().replace("_", "-") == dist.lower().replace("_", "-"):
            return req.split(";")[0].strip()
    return dist


def require_packages(*modules: str, what: str) -> None:
    """Import ``modules``; one that is missing or broken is a UserError naming the ``pip install`` that fixes it.

    For the command-line tools, whose work needs packages that ``import sat_cogvideo`` does not."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            req = _requirement(module)
            if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == module:
                state = "is not installed"
            else:
                state = f"cannot be imported ({err.__class__.__name__}: {err})"
            raise UserError(f"{what} needs the Python package {_DISTRIBUTIONS.get(module, module)!r}, which {state}: "
                            f"pip install '{req}' (or set up with `bash inference.sh`)") from None
