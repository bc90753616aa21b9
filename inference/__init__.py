"""Spine AI inference: models, pipelines, engine runtimes, training and phantoms.

Importing this package is cheap and never imports torch; submodules that need torch
(``spine_node.inference.models``, ``spine_node.inference.train``) import it themselves.
"""
