"""Placeholder: the session-scoped tiny Llama fixture (issue 5) goes here."""
