"""Stage 1: the frozen vision tower, the cache shards it writes and the embed run."""
