"""The assistant's web process: protocol, server, dialogue manager and router."""

__version__ = "0.1.0"
