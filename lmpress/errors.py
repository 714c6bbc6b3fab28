"""User-facing errors.

An `LmpressError` is a mistake the user can fix (a recipe field, a path, an option). The CLI
prints its one-line message and exits with code 2; anything else is a bug and keeps its traceback.
"""


class LmpressError(Exception):
    """A user mistake, reported as one line per problem and exit code 2."""

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p] or ["unknown error"]
        super().__init__("\n".join(self.problems))
