"""A stand-in for the Model Garden's exporters: ``--checkpoint_dir DIR --output OUT``.

Like ``exporter_main_v2.py`` it takes a folder and exports that folder's
latest checkpoint (found through its ``checkpoint`` state file), writing the
SavedModel to ``OUT/saved_model``. ``--fail`` exits 3 after a message.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint_dir", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--fail", action="store_true")
    args = p.parse_args()
    if args.fail:
        print("external exporter: the pipeline config has no such field", file=sys.stderr)
        sys.exit(3)
    import tensorflow as tf

    from daemon.demo.model import build_model

    prefix = tf.train.latest_checkpoint(args.checkpoint_dir)
    print(f"external exporter: exporting {prefix}", flush=True)
    model = build_model()
    tf.train.Checkpoint(model=model).read(prefix).assert_existing_objects_matched()
    model.export(os.path.join(args.output, "saved_model"), verbose=False)


if __name__ == "__main__":
    main()
