"""FeatureStore: batches read from memory after preload() equal those read from HDF5."""
import numpy as np

from pipeline.read import FeatureStore
from workflows.data import TrainData


def test_preloaded_batches_equal_hdf5_batches(synthetic_features):
    disk, memory = FeatureStore(synthetic_features), FeatureStore(synthetic_features)
    caps = disk.split_captions("train")
    from_disk = TrainData(disk, caps, 8, 4, 7, seed=0, preload_bytes=0)
    from_memory = TrainData(memory, caps, 8, 4, 7, seed=0)
    assert not from_disk.in_memory and from_memory.in_memory
    for items in from_disk.plan(0):
        a, b = from_disk.load(items), from_memory.load(items)
        assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert from_memory.load(from_disk.plan(0)[0])["keyword_mask"].any()  # keywords are read too
