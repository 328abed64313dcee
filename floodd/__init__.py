"""floodd: auto-ban daemon that protects DNS servers from packet floods."""

__version__ = "0.1.0"
