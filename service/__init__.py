"""The extrapolation service (FastAPI). Built in a later issue."""

__version__ = "0.1.0"
