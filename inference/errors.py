"""Errors raised by inference code on purpose: one base, a few children.

``inference`` is the lower layer and never imports ``spine_node.node``; the worker
turns an :class:`InferenceError` into a failed job (or a "not performed" report) with
the message as the reason, so messages never carry patient data.
"""


class InferenceError(Exception):
    """Base of every error the inference layer raises on purpose."""


class PipelineError(InferenceError):
    """A pipeline could not turn its input into findings (bad input, model failure)."""


class NotAssessableError(PipelineError):
    """The input is readable but not something the pipeline can assess (one slice, slices
    thicker than the models know, no cervical spine). The message is written for a
    radiologist and becomes the "analysis not performed" reason."""
