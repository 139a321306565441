"""The one exception type for problems a user can fix."""

from __future__ import annotations


class MergeError(Exception):
    """A problem with the user's recipe, files or options.

    `message` names the culprit (file, key, tensor); `hint` says what to change. The CLI prints
    both on their own lines and exits 2, so neither should need a traceback to be understood.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class MergeErrors(MergeError):
    """Several problems found in one pass, reported together so the user fixes them at once."""

    def __init__(self, errors: list[MergeError]) -> None:
        self.errors = errors
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(first.message + more, first.hint)
