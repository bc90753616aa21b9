"""Engine runtimes behind one small interface (``load``, ``infer``).

See :mod:`inference.runtime.base` for the interface; backends live one per module.
"""
