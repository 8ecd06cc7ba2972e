"""Process groups, the DeepSpeed engine, parallel forms of the model, sharded checkpoints."""
