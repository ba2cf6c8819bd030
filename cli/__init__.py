"""Shared command-line plumbing for every entry point: typed config dataclass + YAML presets + overrides."""
