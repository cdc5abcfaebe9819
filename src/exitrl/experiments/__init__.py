"""A run: the pipeline (prepare, fit, evaluate), its record (metrics.json), the run folder as an object,
what it leaves in TensorBoard, and ConsistentEE's co-training around any agent."""
