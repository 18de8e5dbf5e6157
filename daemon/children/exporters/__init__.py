"""One module per checkpoint format: ``export(request) -> result`` in the worker child.

The scanner of the same format lives in :mod:`daemon.sources` (supervisor
side); :class:`daemon.sources.SourceKind.exporter` names the module here.
"""
