"""Triage: an OpenAI-compatible gateway that routes LLM requests across GPU tiers."""
