"""Readers of the container families, one module each; importing this package registers them in order."""
