"""The plain-script baseline: what a team runs today instead of the daemon.

``python bench/baseline.py small|resnet50 CHECKPOINT_PREFIX OUT_DIR``: import
TensorFlow, build the model, restore the checkpoint, ``tf.saved_model.save``,
reload with ``tf.saved_model.load`` and call it once. Prints its phase times
as one JSON line. (It validates far less than the daemon does: no graph-mode
load as TF Serving does it, no comparison of outputs.)
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    t0 = time.monotonic()
    name, prefix, out = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import models
    import tensorflow as tf

    t_import = time.monotonic()
    model = getattr(models, name)()
    tf.train.Checkpoint(model=model).read(prefix).expect_partial()
    t_restore = time.monotonic()
    tf.saved_model.save(model, out)
    t_save = time.monotonic()
    loaded = tf.saved_model.load(out)
    fn = loaded.signatures["serving_default"]
    spec = next(iter(fn.structured_input_signature[1].values()))
    fn(tf.zeros([1, *spec.shape[1:]], spec.dtype))
    t_reload = time.monotonic()
    print(
        json.dumps(
            {
                "import": t_import - t0,
                "build_restore": t_restore - t_import,
                "save": t_save - t_restore,
                "reload": t_reload - t_save,
            }
        )
    )


if __name__ == "__main__":
    main()
