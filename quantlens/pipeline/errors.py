"""Errors the command line answers with one line and an exit code (no traceback).

Light on purpose (no MLflow, no Prefect): the CLI catches these by class before importing either.
"""

from __future__ import annotations

from quantlens.errors import ConfigError


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached: raised before any evaluation starts."""


class CredentialsRefused(RuntimeError):
    """A control-plane server (MLflow, Prefect) refuses our credentials, or they cannot write: no retry helps."""


class PreflightError(ConfigError):
    """Something the sweep needs is missing (a model folder, a cached model, a data file)."""


class SweepIncomplete(RuntimeError):
    """Some (model, setting) runs failed; the others finished and are logged. Rerun to redo them."""


class AnalysisFailed(RuntimeError):
    """A mechanism analysis failed (its evaluation runs are unaffected). Rerun to redo only it."""


class NotEvaluated(RuntimeError):
    """``quantlens explain`` needs the evaluations it explains: they are not FINISHED yet."""


EXPECTED = (SweepIncomplete, AnalysisFailed, NotEvaluated)  # reported by the CLI in one line

__all__ = ["AnalysisFailed", "ConfigError", "CredentialsRefused", "EXPECTED", "NotEvaluated", "PreflightError", "SweepIncomplete", "TrackingUnavailable"]
