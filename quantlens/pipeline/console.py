"""What a sweep tells the person who started it: quiet by default, one live progress display.

Framework-free (the flows call it; it prints). Every event also goes to Prefect's run logger (the Prefect UI and worker logs keep everything). When the
CLI runs a sweep in-process it turns the console display on (``QUANTLENS_CONSOLE=1``) and Prefect's
own console logging down to warnings: the terminal then shows one line per finished run (runs
done / total, model · setting, its numbers, ETA), a live status line on a TTY (current model ·
setting · dataset, batches, throughput), and one line per failure naming where its traceback is.
``--verbose`` (``QUANTLENS_VERBOSE=1``) restores Prefect's INFO logs and per-batch progress lines.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field


def console_enabled() -> bool:
    return os.environ.get("QUANTLENS_CONSOLE") == "1"


def verbose() -> bool:
    return os.environ.get("QUANTLENS_VERBOSE") == "1"


def _fmt_eta(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds)))


@dataclass
class Progress:
    """Runs done / total of one attempt, with an ETA from the mean time of the runs evaluated."""

    total: int
    done: int = 0
    evaluated: int = 0
    started: float = field(default_factory=time.perf_counter)

    def tick(self, evaluated: bool) -> str:
        self.done += 1
        self.evaluated += int(evaluated)
        left = self.total - self.done
        eta = _fmt_eta((time.perf_counter() - self.started) / self.evaluated * left) if self.evaluated else "?"
        return f"[{self.done}/{self.total}, ETA {eta}]"


_ATTEMPTS: dict[str, Progress] = {}


def progress_for(attempt: str, total: int) -> Progress:
    """The attempt's progress: the whole grid when the sweep registered it (in-process), else
    this model's settings (a model flow on a worker)."""
    return _ATTEMPTS.setdefault(attempt, Progress(total=total))


def start_attempt(attempt: str, total: int) -> Progress:
    _ATTEMPTS[attempt] = Progress(total=total)
    return _ATTEMPTS[attempt]


def end_attempt(attempt: str) -> None:
    _ATTEMPTS.pop(attempt, None)


class _Live:
    """One status line rewritten in place on a TTY (nothing on a pipe or file)."""

    def __init__(self) -> None:
        self.width = 0

    def show(self, text: str) -> None:
        if not (console_enabled() and sys.stderr.isatty()):
            return
        text = text[:160]
        sys.stderr.write("\r" + text + " " * max(0, self.width - len(text)))
        sys.stderr.flush()
        self.width = len(text)

    def clear(self) -> None:
        if self.width and sys.stderr.isatty():
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
        self.width = 0


LIVE = _Live()


def say(text: str) -> None:
    """A permanent console line (above the live line)."""
    if console_enabled():
        LIVE.clear()
        sys.stderr.write(text + "\n")  # not print(): flows with log_prints would capture it
        sys.stderr.flush()


def status(text: str) -> None:
    LIVE.show(text)


class QuietConsoleFilter(logging.Filter):
    """The console side of quiet mode (Prefect's API handler still sends everything to the UI):
    a failure the sweep reports in one line prints no traceback and no echo — task-run failures
    (the flow reports each as one line), "Finished in state Failed(...)" lines, and the flow's
    "Encountered exception" record of an expected error (the CLI prints it once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from quantlens.pipeline.errors import EXPECTED

        if record.levelno >= logging.ERROR and record.name.startswith("prefect.task_runs"):
            return False
        if "Finished in state Failed" in record.getMessage():
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and isinstance(exc, EXPECTED):
            return False
        if record.exc_info and record.name.startswith("prefect"):
            record.exc_info, record.exc_text = None, None  # one line; the traceback is in the Prefect UI / MLflow
        return True
