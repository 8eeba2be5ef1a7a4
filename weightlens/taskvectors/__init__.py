"""Task vectors: a base checkpoint and named fine-tunes, read as fp32 deltas one key at a time.

``TaskVectors`` (``_core``) reads deltas; ``_keys`` selects the keys and matches each fine-tune's
names to the base's (key maps, prefixes, extras); ``_vocab`` handles fine-tunes with added
vocabulary rows (``vocab="base"`` / ``"union"``, the union tokenizer).
"""

from weightlens.taskvectors._core import Kind, TaskVectors, parameter_kind
from weightlens.taskvectors._keys import KeyMapWarning
from weightlens.taskvectors._vocab import VocabInfo

__all__ = ["KeyMapWarning", "Kind", "TaskVectors", "VocabInfo", "parameter_kind"]
