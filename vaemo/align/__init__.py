"""Stage 2 (docs/method.md, "Stage 2"): dual-path contrastive alignment of the Stage 1 AV space with the
captions' text embeddings, zero-shot emotion scoring and text search over clip embeddings.

``model``: the aligned model (Stage 1 ``AVMAE`` + text projection heads) and its files;
``data``: caption rows of a pinned LanceDB version joined with the shards; ``train``: the
objective and the run (the shared training loop); ``search``: the clip-embeddings table.
"""
