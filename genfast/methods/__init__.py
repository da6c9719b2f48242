"""Acceleration methods: each module is a Config dataclass plus an apply() registered with genfast.api."""
