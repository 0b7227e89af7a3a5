"""The one exception type for mistakes a user can fix.

The CLI prints a ``GptlabError`` as a single line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class GptlabError(Exception):
    """A user-facing error: bad input, a missing file, an unknown name. The message says how to fix it."""
