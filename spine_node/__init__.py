"""spine-node: a DICOM listener node that routes spine studies to AI pipelines.

One import name for the repository's top-level folders, mapped by the build
(``pyproject.toml``, ``[tool.setuptools] package-dir``):

- ``spine_node.node``: the wire, the queue and back (``node/``); never imports torch;
- ``spine_node.inference``: models, pipelines, engine runtimes, training, phantoms
  (``inference/``); never imports ``spine_node.node``;
- ``spine_node.engines``: the model repository (``engines/``);
- ``spine_node.migrations``: the Alembic environment (``migrations/``).
"""

__version__ = "0.1.0"
