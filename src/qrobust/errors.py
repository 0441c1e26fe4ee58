"""One exception type for every user-facing mistake, so the CLI can print it and exit non-zero."""


class QrobustError(ValueError):
    """A problem with the user's input: the message says what is wrong and how to fix it."""
