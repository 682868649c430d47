"""Difficulty classifiers: plain scikit-learn, no server code."""

__all__: list[str] = []
