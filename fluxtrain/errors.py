"""The one exception type for user mistakes: the command line prints it as a single line, without a traceback."""


class FluxtrainError(ValueError):
    """Bad input from the user: a setting, a file or a prompt. The message names the problem and the setting."""
