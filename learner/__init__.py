"""The learner: off-policy clipped updates on queue micro-batches, weight broadcast to actors."""
