"""Generator processes: sample groups, score them, compute advantages, stream to the queue."""
