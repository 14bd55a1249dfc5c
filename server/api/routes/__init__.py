"""Thin HTTP routes: parse, call the engine or the registry, shape the answer. No logic of their own."""
