"""Plugins: the hook specifications and the built-in plugin that registers the built-in backends."""
