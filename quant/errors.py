"""The one exception type for problems the user can fix (bad files, bad flags, too-small budgets).

It lives in `quant`, the lowest layer, so that `quant`, `lut` and `offload` raise the same type
without `quant`/`lut` importing `offload`. The CLI turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager


class UserError(Exception):
    """A problem with the user's input: the message names the file or field and what would fix it."""


def shown(value, limit: int = 60) -> str:
    """A value as a JSON file spells it (`true`, not `True`), cut short: a bad field may hold a long list."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):  # not JSON (a dataclass built in Python): its repr
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def writing(path):
    """Writing output under `path`: a filesystem refusal (a file where a folder belongs, permission denied, a
    full disk) is the user's to fix, so it becomes one UserError naming the path instead of a traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as exc:
        where = exc.filename or path
        # mkdir(exist_ok=True) on a file says "File exists", which reads as if the folder were there.
        why = "a file, not a folder" if isinstance(exc, FileExistsError) and not os.path.isdir(where) else exc.strerror
        raise UserError(f"{where}: cannot write ({why or exc})") from None
    except SafetensorError as exc:  # safetensors' save_file reports its I/O errors this way
        raise UserError(f"{path}: cannot write ({exc})") from None
