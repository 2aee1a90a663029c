"""Reading the shard contract into training batches."""
