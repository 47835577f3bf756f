"""The offline demo: synthetic images and records, a tiny CLIP and tokenizer, in every layout."""
