"""Named exit codes (BSD sysexits) shared by the CLI, the supervisor and its children."""

from __future__ import annotations

OK = 0
#: A child found the checkpoint or model bad: retrying the same input cannot help.
PERMANENT_FAILURE = 65  # EX_DATAERR
#: An internal error in the daemon itself.
SOFTWARE = 70  # EX_SOFTWARE
#: A child could not even write its result file: the disk is full (transient).
NO_SPACE = 74  # EX_IOERR
#: A child failed for a reason that may pass (resources, interruption): retry later.
TRANSIENT_FAILURE = 75  # EX_TEMPFAIL
#: The configuration is invalid; systemd's RestartPreventExitStatus names this code.
CONFIG = 78  # EX_CONFIG
