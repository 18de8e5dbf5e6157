"""Everything about a TF Serving base path, behind one storage seam.

:mod:`.layout` names every path the daemon uses under a base path (the
``.ckpt-exporter/`` folder and the files inside versions); :mod:`.storage`
is the only code that reads or writes a base path
(:class:`.storage.BasePathStorage`, with the POSIX backend of today,
:class:`.storage.PosixStorage`, picked by :func:`.storage.storage_for`);
:mod:`.catalog` reads the published versions back; :mod:`.publish` is the
publish step and the start-up clean-up; :mod:`.records` the record of rejected
checkpoints; :mod:`.operations` the operator's actions (rollback, pin, unpin)
and their records (rolled-back checkpoints, pinned versions). The modules
other than :mod:`.storage` take a base path, obtain its storage and call it.
Supervisor side: nothing here imports TensorFlow or NumPy.
"""
