"""The exact response cache: plan (key, rules), entries, replay, single-flight lookup."""
