"""Infrastructure every layer may use: options checking, devices, hashing, split names, metrics, progress,
checkpoints, torch.distributed, CUDA graphs and the observation layout. Nothing here imports the rest of exitrl."""
