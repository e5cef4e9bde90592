"""Byte sizes as people write them ('12GiB', '512MiB', '1.5GB', '2TiB'), parsed once for every layer: budgets
are ints inside, and strings only at the edge."""

from __future__ import annotations

import math
import re
from fractions import Fraction

from .errors import UserError

# Our own table rather than accelerate's convert_file_size_to_int: that one knows no TiB/TB, overflows on
# 'infGiB', and reads a lower-case b ('12Gb', '12gb') as bits, silently an eighth of the budget meant.
BINARY_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
DECIMAL_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
EXAMPLES = "use e.g. 12GiB, 512MiB, 1.5GB, 2TiB or a number of bytes"
SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([A-Za-z]*)")
LARGEST = 2**63 - 1  # bytes: beyond any machine (and beyond what torch and the OS take as a size)


def parse_bytes(value: str | int | float | None, flag: str) -> int | None:
    """'12GiB', '512MiB', '1.5GB', '2TiB' or a plain number of bytes -> int bytes; None stays None (= default)."""
    if value is None:
        return None
    if isinstance(value, bool) or (isinstance(value, (int, float)) and not (math.isfinite(value) and value >= 0)):
        raise UserError(f"{flag} {value!r} is not a size ({EXAMPLES})")
    size = value if isinstance(value, (int, float)) else _parse(value, flag)
    if size is None or size > LARGEST:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise UserError(f"{flag} {shown} is larger than any machine's memory ({EXAMPLES})")
    return int(size)


def _parse(value: str, flag: str) -> int | None:
    """The bytes `value` says, or None where its number has more digits than any size (Python's int() of a
    very long digit string fails on its own)."""
    text = str(value).strip().replace(" ", "")
    match = SIZE.fullmatch(text)
    if match is None:
        raise UserError(f"{flag} {value!r} is not a size ({EXAMPLES})")
    number, unit = match.groups()
    if len(number.split(".")[0]) > 30:
        return None
    upper = unit.upper()
    if upper in BINARY_UNITS:
        scale = BINARY_UNITS[upper]
    elif upper in DECIMAL_UNITS and unit.endswith("B"):
        scale = DECIMAL_UNITS[upper]
    elif upper in ("", "B") and "." not in number:
        return int(number)  # exact, however long
    elif upper in ("K", "M", "G", "T") or upper in DECIMAL_UNITS:  # the latter here only with a lower-case b
        # '12G' could be GiB or GB (7% apart, 10% at T) and '12Gb' gigabits (8x): too much to guess at for a
        # memory budget, so the user picks.
        prefix = upper[0]
        raise UserError(f"{flag} {value!r} is not a size (write {number}{prefix}iB or {number}{prefix}B)")
    else:
        raise UserError(f"{flag} {value!r} is not a size ({EXAMPLES})")
    return int(Fraction(number) * scale)  # exact: a float would overflow on a few hundred digits
