"""The model package: its folder layout and schema (manifest.py), the verified loading of its
files (model.py) and the migration from the flat layout (migrate.py)."""
