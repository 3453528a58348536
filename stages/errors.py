"""One error type for everything a user can get wrong: the CLI prints its message as one line, no traceback."""


class PipelineError(Exception):
    """A problem with the user's input, files or machine, phrased for the user."""


def fail(message: str) -> "PipelineError":
    return PipelineError(message)
