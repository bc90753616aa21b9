"""The node's exceptions: one base, a few meaningful children.

Tasks and handlers turn these into audit states and DICOM statuses; anything that is
not a :class:`NodeError` is unexpected, logged and re-raised.

Errors from inference code (models, engines, pipelines) descend from
:class:`spine_node.inference.errors.InferenceError`, the lower layer's own base.
"""


class NodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(NodeError):
    """The configuration is invalid; the message names the bad value."""


class InvalidUIDError(NodeError):
    """A UID failed validation (length, characters, path safety)."""


class SpoolError(NodeError):
    """An instance could not be written safely into the spool."""


class OutOfSpaceError(SpoolError):
    """The spool volume has less free space than the configured minimum."""


class RoutingError(NodeError):
    """A routing rule is invalid or a series could not be routed."""


class ResultsError(NodeError):
    """Findings could not be encoded as DICOM (SEG, SR) or written to the results folder."""


class DispatchError(NodeError):
    """A result could not be sent to a destination."""


class JobStateError(NodeError):
    """A job is not in a state that allows the requested action."""
