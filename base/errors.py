"""User-facing errors.

Anything a user can cause (a bad path, config key, value or input file) raises UserError with
a message that names the file, key or value. The CLI prints it as one line and exits 2; any
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error in the user's input, reported as one line without a traceback."""
