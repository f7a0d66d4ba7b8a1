"""The engine-agnostic Kontext edit (DESIGN 2)."""
