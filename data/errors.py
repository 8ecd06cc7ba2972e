"""The one exception type the data pipeline raises for problems a user can fix."""


class DataError(Exception):
    """A data problem explained in one line: what is wrong, which file, and the fix.

    The launcher prints ``error: <str(exc)>`` and exits with status 2, so the
    message is forced onto a single line here rather than trusted to callers.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split("\n")))
