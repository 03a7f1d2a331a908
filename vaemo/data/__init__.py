"""Data: ingest shards to batches of aligned face windows and voice fbanks, for training and evaluation.

``config``: the data path's settings (no heavy imports: the configuration reads it); ``samples``:
one shard sample to one window; ``loader``: the WebDataset pipelines and DataLoaders.
"""
