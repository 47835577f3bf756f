"""Stage 2: text, samples and batches, the model, and the training loop."""
