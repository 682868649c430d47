"""OpenAI request and response shapes, error bodies and SSE helpers."""
