"""Byte sizes as people write them ('12GiB', '512MiB', '1.5GB'), parsed once for every layer: budgets are
ints inside, and strings only at the edge."""

from __future__ import annotations

from .errors import UserError


def parse_bytes(value: str | int | float | None, flag: str) -> int | None:
    """'12GiB', '512MiB', '1.5GB' or a plain number of bytes -> int bytes; None stays None (= default)."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    text = str(value).strip().replace(" ", "")
    if text.isdigit():
        return int(text)
    from accelerate.utils import convert_file_size_to_int

    try:
        return int(convert_file_size_to_int(text))
    except ValueError:
        raise UserError(f"{flag} {value!r} is not a size (use e.g. 12GiB, 512MiB, 1.5GB or a number of bytes)") from None
