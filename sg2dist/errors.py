"""The one exception type for mistakes a user can fix.

Anything raised as `UserError` reaches the terminal as a single line
(`sg2dist: error: ...`) with no traceback, so its message must name the thing
that is wrong and say how to fix it.
"""


class UserError(Exception):
    """A problem the user caused and can fix (bad config, missing file, bad credentials)."""
