"""The training engine: packs of runs fed by a source (the CIFAR split on the device, or a loader), a CUDA-graph step."""
