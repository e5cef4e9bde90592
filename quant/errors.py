"""The one exception type for problems the user can fix (bad files, bad flags, too-small budgets).

It lives in `quant`, the lowest layer, so that `quant`, `lut` and `offload` raise the same type
without `quant`/`lut` importing `offload`. The CLI turns it into one line on stderr and exit code 2.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the file or field and what would fix it."""
