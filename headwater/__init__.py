"""headwater: keeps an LLM application's knowledge fresh (wiring: CLI, settings, local stack)."""

__version__ = "0.1.0"
