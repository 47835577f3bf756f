"""A trained run: captioning, evaluation and export to transformers."""
