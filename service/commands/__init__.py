"""CLI command groups; each module has `add_parsers(sub)` and sets `func(settings, args) -> int`."""
