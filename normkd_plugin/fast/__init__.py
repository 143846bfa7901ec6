"""The fast trainer: device-resident data, batched augmentation, a CUDA-graph step."""
