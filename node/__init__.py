"""spine-node: a DICOM listener node that routes spine studies to AI pipelines.

The node (everything under ``node``) never imports torch; inference code lives in
``inference`` and is loaded only by workers.
"""

__version__ = "0.1.0"
