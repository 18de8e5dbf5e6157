"""The config file: typed form and loading (:mod:`.loading`), key schema (:mod:`.schema`), builders.

Supervisor side. Import from the submodules: :mod:`.schema` is used by the
checkpoint sources, which :mod:`.loading` itself imports.
"""
