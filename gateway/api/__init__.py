"""OpenAI request and response shapes, error bodies and SSE helpers."""

__all__: list[str] = []
