"""One exception type for every mistake a user can make.

The CLI turns a `DistillError` into a one-line `error: ...` message and exit code 1, with no
traceback. Raise it for bad input (files, config, mismatched caches); let real bugs raise anything else
so that they keep their traceback.
"""


class DistillError(Exception):
    """A user-facing error whose message is a single line that says what is wrong and what to do."""
