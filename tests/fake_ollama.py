"""Placeholder: the faithful fake Ollama server and its pytest fixture (issue 4) go here."""
