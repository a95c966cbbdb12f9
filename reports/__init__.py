"""Reports: read result tables (``reports.load``) and turn them into comparisons."""

from reports.load import ResultsError, load, load_steps

__all__ = ["ResultsError", "load", "load_steps"]
