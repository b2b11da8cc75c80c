"""Scripted investigations and the embedded sandbox."""
