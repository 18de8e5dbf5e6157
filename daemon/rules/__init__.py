"""Pure decisions: no I/O, no clocks (``now`` is passed in), no process state.

Planning which checkpoint goes next (:mod:`.planner`), the metric gate
(:mod:`.gate`), the health verdict (:mod:`.health`), failure reasons and
their classification (:mod:`.failures`) and TF Serving's version rules
(:mod:`.versions`). Each is tested fast and exhaustively on its own.
"""
