"""``source = "tf1_checkpoint"``: ``tf.compat.v1.train.Saver`` checkpoints with their graph.

Layout: ``model.ckpt-N.index``, ``.data-*`` and ``.meta`` (the MetaGraph),
plus the ``checkpoint`` state file. Completeness is the TF2 rule (index with
its footer, every shard; see :mod:`daemon.sources.tf_checkpoint`) plus the
``.meta`` file, which ``Saver.save`` writes last, by rename.

No builder: the graph comes from the ``.meta`` file. The config maps the
signature's inputs and outputs to tensor names of that graph
(``inputs = { images = "x:0" }``, ``outputs = { scores = "y:0" }``). The
export runs in graph mode the way ``SavedModelBuilder`` does: import the
MetaGraph, restore the checkpoint into a session, and save tag ``serve`` with
the signature and the graph's table initializers as the main op, so lookup
tables are filled when TF Serving loads the model.
"""

from __future__ import annotations

from typing import Any

from daemon.config.schema import REQUIRED, nonempty, one_of, string_table
from daemon.protocol import EXPORTERS_PACKAGE
from daemon.sources.base import SourceKind
from daemon.sources.tf_checkpoint import TFCheckpointSource

METHODS = (
    "tensorflow/serving/predict",
    "tensorflow/serving/classify",
    "tensorflow/serving/regress",
)


class TF1CheckpointSource(TFCheckpointSource):
    """TF2's completeness rule plus the ``.meta`` graph, which is pinned along.

    Works on object stores as the TF2 source does: the ``.meta`` is looked
    for in the same listing, so it costs no request of its own.
    """

    def _extra_files(self, prefix: str) -> tuple[str, ...]:
        return (prefix + ".meta",)  # Saver writes the graph last


def _tensor_table(v: Any) -> str | None:
    problem = string_table(v) or nonempty(v)
    if problem is None and any(":" not in name for name in v.values()):
        return 'values must be tensor names like "x:0"'
    return problem


KIND = SourceKind(
    name="tf1_checkpoint",
    scanner=TF1CheckpointSource,
    exporter=f"{EXPORTERS_PACKAGE}.tf1_checkpoint",
    options={
        "inputs": ((dict,), REQUIRED, _tensor_table),
        "outputs": ((dict,), REQUIRED, _tensor_table),
        "signature_name": ((str,), "serving_default", nonempty),
        "method_name": ((str,), METHODS[0], one_of(*METHODS)),
    },
    builder="unused",
    weights_in_checkpoint=True,
    remote_dirs=True,
)
