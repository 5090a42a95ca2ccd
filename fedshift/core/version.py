"""The package version (read by the run summary, which records the versions a run used)."""

__version__ = "0.1.0"
