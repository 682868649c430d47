"""How both stores name keys: the prefix rule they enforce and glob escaping."""

from __future__ import annotations

import re

__all__ = ["check_prefix", "escape_glob"]


def check_prefix(prefix: str) -> str:
    """`prefix`, or `ValueError` if it holds a brace."""
    # A brace in the prefix would become every key's hash tag (or, as `{}`, disable hash
    # tags): keys meant to share a slot could then land in different ones.
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"store key_prefix must not contain '{{' or '}}', got {prefix!r}")
    return prefix


def escape_glob(text: str) -> str:
    """`text` matched literally in a Redis glob pattern (the key prefix)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
