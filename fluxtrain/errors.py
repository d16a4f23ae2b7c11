"""The one exception type for user mistakes: the command line prints it as a single line, without a traceback."""


class FluxtrainError(ValueError):
    """Bad input from the user: a setting, a file or a prompt. The message names the problem and the setting."""


def describe_failure(e: BaseException) -> str:
    """`Type: first line of the message` (at most 160 characters), for a one-line note about a failed attempt."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
