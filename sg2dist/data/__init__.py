"""Datasets: `sg2dist prepare` (images -> shards), the manifest, and the training stream.

manifest = open_manifest(url)                   # dataset.json, checked
check_resolution(manifest, resolution, channels)
loader = build_loader(url, batch_gpu=..., rank=..., world_size=..., seed=..., workers=...,
                      mirror=..., shuffle_buffer=..., use_labels=..., state=saved_or_None)
for batch in loader:                            # Batch(img_NCHW uint8, c float, ...)
    ...; loader.state.update(batch)             # after the batch is consumed
"""

from sg2dist.data.digits import ensure_digits_dataset
from sg2dist.data.manifest import Manifest, ShardInfo, check_resolution, open_manifest
from sg2dist.data.shards import iter_images
from sg2dist.data.stream import Batch, StreamLoader, StreamState, build_loader

__all__ = [
    "Batch",
    "Manifest",
    "ShardInfo",
    "StreamLoader",
    "StreamState",
    "build_loader",
    "check_resolution",
    "ensure_digits_dataset",
    "iter_images",
    "open_manifest",
]
