"""Backends: one module (or package) each, with its support declared at its top."""
