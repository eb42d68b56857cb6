"""User-facing errors: one line that names the problem and the fix, never a traceback."""


class AtlasError(Exception):
    """A problem the user can fix. The CLI prints `error: <message>` and exits non-zero."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class NotFound(AtlasError):
    """Something named by the user does not exist."""


class SchemaOutOfDate(AtlasError):
    """The database exists but its schema is older (or newer) than this code."""


class Conflict(AtlasError):
    """The request contradicts the current state (a name in use, cancelling what has ended): 409."""


class EmbeddingUnavailable(AtlasError):
    """Texts cannot be embedded now: the model is missing or the endpoint does not answer."""

    retryable = True


class EmbeddingModelMissing(EmbeddingUnavailable):
    """The configured embedding model is not installed / not found: retrying cannot help."""

    retryable = False
