"""minivlm: embed images with a frozen CLIP once (stage 1), train a small VLM from the cache many times (stage 2)."""
__version__ = "0.1.0"
