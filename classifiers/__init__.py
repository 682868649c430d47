"""Difficulty classifiers: plain scikit-learn, no server code."""
