"""UserError: a problem with what the user asked for (a bad file, option or model), not a bug.

The command line prints such errors as one clear message and exits with status 2, without a traceback;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: missing or malformed files, invalid options, an unusable model."""
