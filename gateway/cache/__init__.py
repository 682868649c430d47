"""The exact response cache: plan (key, rules), entries, replay, single-flight lookup."""

__all__: list[str] = []
