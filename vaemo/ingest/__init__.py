"""Ingest: source videos to face-cropped video + voice clips in WebDataset shards."""
