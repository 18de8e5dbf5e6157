"""ckpt-exporter: export TensorFlow checkpoints to validated TF Serving versions.

The package is importable without TensorFlow: only :mod:`daemon.children.worker` and
:mod:`daemon.children.validator`, which run as child processes, import it.
"""

from __future__ import annotations

__version__ = "0.1.0"
