"""Tensor key names: which block (layer) of a checkpoint a key belongs to."""

from __future__ import annotations

import re

__all__ = ["block_of"]

_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def block_of(key: str) -> str:
    """Block of a tensor key: the prefix up to its first numeric component (the layer index).

    ``"encoder.layer.3.attention.self.query.weight"`` -> ``"encoder.layer.3"``. Keys without a
    layer index keep their module path (``"embeddings.word_embeddings.weight"`` ->
    ``"embeddings.word_embeddings"``); a bare name is its own block.

    Examples
    --------
    >>> block_of("encoder.layer.3.attention.self.query.weight"), block_of("pooler.dense.bias"), block_of("scale")
    ('encoder.layer.3', 'pooler.dense', 'scale')
    """
    match = _LAYER.match(key)
    if match:
        return match.group(1)
    return key.rsplit(".", 1)[0] if "." in key else key
