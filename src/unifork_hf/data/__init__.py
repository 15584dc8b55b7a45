"""Datasets that ship with the package (procedural, generated from a seed)."""
