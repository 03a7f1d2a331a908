"""vaemo: audio-visual emotion representation learning (VAEmo), from raw corpora to benchmarks."""

__version__ = "0.1.0"
