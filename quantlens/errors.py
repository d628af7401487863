"""Errors every floor may raise (docs/ARCHITECTURE.md: the root floor imports nothing of quantlens)."""


class ConfigError(ValueError):
    """An invalid setting or config; the message names the field."""
