"""Checks the ``rewardkit`` commands make before any work, and their progress summary.

Everything knowable up front (output paths, the device, image counts and sizes) is checked before a
model is loaded or an image is scored, so a user error costs seconds, not the whole run, and reads as one
line ``rewardkit: error: ...`` naming the command-line flag (``--weights fid=PATH``, not ``weights=``).
Long passes show a tqdm bar on terminals and print one summary line otherwise (logs).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["check_output", "check_device", "weights_hint", "report_pass", "one_line"]


def check_output(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Raise ``ValueError`` now, before any work, if ``path`` cannot be written (a folder, a parent that is a
    file, a read-only place). Missing parent folders are fine (they are made when the file is written)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name inside it")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {path}: {ancestor} is a file, not a folder; choose another path")
    try:  # a real probe (os.access says yes to root, and on read-only mounts)
        if path.exists():
            open(path, "a").close()  # opening to append changes neither contents nor mtime
        else:
            tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot write there ({error.strerror or error}); choose a writable "
                         "path") from None
    return path


def check_device(device: str | None) -> None:
    """Raise ``ValueError`` now if ``--device`` names no usable device (e.g. cuda on a machine without CUDA)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"--device {device}: not a device ({error}); use e.g. cpu, cuda, cuda:1 or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU: check the "
                   "driver and CUDA_VISIBLE_DEVICES" if torch.version.cuda else
                   f"torch {torch.__version__} is a CPU-only build: install a CUDA build of torch")
            raise ValueError(f"--device {device}: CUDA is not available here ({why}); or use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 to "
                             f"cuda:{torch.cuda.device_count() - 1})")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")


@contextlib.contextmanager
def weights_hint(name: str) -> Iterator[None]:
    """Loading ``name``'s model: a weights problem becomes a one-line ``ValueError`` naming ``--weights``.

    The library's messages name the Python argument (``weights=...``); the CLI user needs the flag. A failed
    download (no network, a proxy) is a ``RuntimeError`` in the library and a user error here.
    """
    flag = f"--weights {name}=PATH"
    try:
        yield
    except (ValueError, OSError, RuntimeError) as error:
        message = str(error)
        if isinstance(error, RuntimeError) and "download" not in message:
            raise  # a model-code failure, not a weights problem: keep its traceback
        message = message.replace("weights=...", flag).replace("weights=None", f"no {flag}")
        if flag not in message:
            message += f" (pass a local file with {flag})"
        raise ValueError(message) from error


def report_pass(what: str, count: int, seconds: float, unit: str = "images") -> None:
    """The one-line summary of a long pass on stderr when it is not a terminal (a log; terminals had the bar):
    ``scored 40 images in 12.3 s (3.2 img/s)``."""
    if sys.stderr.isatty():
        return
    rate = count / seconds if seconds > 0 else float("inf")
    short = "img" if unit == "images" else unit
    print(f"{what} {count} {unit} in {seconds:.1f} s ({rate:.1f} {short}/s)", file=sys.stderr)


def one_line(message: str) -> str:
    """``message`` on one line (an error's lines joined with spaces)."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())
