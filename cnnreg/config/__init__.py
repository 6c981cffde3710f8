"""Recipes: the pydantic model built from the catalog, loading, overrides, located errors, the JSON Schema and the README reference."""
