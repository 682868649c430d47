"""Triage: an OpenAI-compatible gateway that routes LLM requests across GPU tiers."""

__all__: list[str] = []

__version__ = "0.1.0"
