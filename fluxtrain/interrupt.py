"""Stopping on SIGINT/SIGTERM: finish the step, write a checkpoint and exit; a second signal exits at once."""

from __future__ import annotations

import logging
import signal
import threading

from fluxtrain.errors import FluxtrainError

log = logging.getLogger("fluxtrain")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(FluxtrainError):
    """The run stopped on a signal after writing a checkpoint; the exit status is the shell's 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.reported = True  # the loop logged the stop, with its checkpoint and the command that resumes


class StoppedInSetup(SystemExit):
    """SIGTERM before the training loop: raised at once, as SIGINT raises KeyboardInterrupt, so that the run stops
    before it has written anything and the command can leave its folder as it was. A SystemExit with the status of a
    process ended by SIGTERM, so that no `except Exception` on the way (a torch.compile fallback) takes it for a
    failure, and a script that does not catch it ends as SIGTERM would have ended it."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


class GracefulStop:
    """Signal handlers that only ask the loop to stop; used as a context manager that restores the previous ones.

    `install()` is called just before the loop. Until then an interrupt stops at once: SIGINT raises
    KeyboardInterrupt and SIGTERM `StoppedInSetup`. Handlers are installed only from the main thread (Python allows
    no other).
    """

    def __init__(self):
        self.signum: int | None = None
        self.finishing = False  # past the loop: a signal now waits for the run's results, then stops it
        self._previous: dict[int, object] = {}  # the handlers before this one, put back by `restore`

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def stopped_by(self) -> str:
        """What stopped the run, once any rank of it was signalled: this rank's signal, or another rank's."""
        return self.signal_name or "a signal to another rank"

    def install(self) -> None:
        """From here on a signal only asks the loop to stop."""
        self._set(STOP_SIGNALS, self._handle)

    def _set(self, signums, handler) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in signums:
            self._previous.setdefault(signum, signal.signal(signum, handler))

    def _stop_setup(self, signum: int, frame) -> None:
        raise StoppedInSetup

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.requested:
            self.restore()
            log.warning(f"second {signal.Signals(signum).name}: stopping now, without a checkpoint")
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        again = "press Ctrl-C again" if signum == signal.SIGINT else "send it again"
        then = (
            "writing the run's results, then stopping"
            if self.finishing
            else ("finishing this iteration, then writing a checkpoint")
        )
        log.warning(f"{self.signal_name} received: {then} ({again} to stop at once)")

    def __enter__(self) -> GracefulStop:
        self._set((signal.SIGTERM,), self._stop_setup)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
