"""Data: ingest shards to batches of aligned face windows and voice fbanks, for training and evaluation."""

from vaemo.data.config import DataConfig
from vaemo.data.loader import Skipped, collate, count_samples, make_dataset, make_loader
from vaemo.data.samples import SampleError, Window, choose_window, load_sample

__all__ = ["DataConfig", "SampleError", "Skipped", "Window", "choose_window", "collate", "count_samples", "load_sample",
           "make_dataset", "make_loader"]
