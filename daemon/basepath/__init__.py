"""Everything about a TF Serving base path, behind one storage seam.

:mod:`.layout` names every path the daemon uses under a base path (the
``.ckpt-exporter/`` folder and the files inside versions); :mod:`.storage`
is the only code that reads or writes a base path (:class:`.storage.BasePath`,
with the POSIX backend of today); :mod:`.catalog` reads the published
versions back; :mod:`.publish` is the publish step; :mod:`.records` the
daemon's records (rejected checkpoints, rolled-back versions, pinned
versions); :mod:`.operations` the operator's actions (rollback, pin, unpin).
Supervisor side: nothing here imports TensorFlow or NumPy.
"""
