"""Held-out phantom generators, written independently of ``inference/phantoms.py``.

They exist only to evaluate models trained on the project's own phantoms (a second,
structurally different anatomy and acquisition model); never train on them. See
docs/heldout-phantoms.md.
"""

from spine_node.inference.heldout import _negatives as _negatives  # registers the negative kinds
