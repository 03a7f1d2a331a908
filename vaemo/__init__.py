"""vaemo: audio-visual emotion representation learning (VAEmo), from raw corpora to benchmarks."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `vaemo.encode` without importing torch for every `import vaemo`.
    if name == "encode":
        from vaemo.embed import encode

        return encode
    raise AttributeError(f"module 'vaemo' has no attribute {name!r}")
