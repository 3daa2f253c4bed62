"""The model package: the card schema and the verified loading of the model files."""
