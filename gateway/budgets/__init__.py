"""Spend budgets and rate limits that hold exactly across replicas: reserve, then settle."""

__all__: list[str] = []
