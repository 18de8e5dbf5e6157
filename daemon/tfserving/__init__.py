"""What the daemon tells TF Serving, and asks it, besides the version folders.

- :mod:`~daemon.tfserving.model_config`: the ``--model_config_file`` the
  daemon owns (rendered with TF Serving's own protos, written atomically);
- :mod:`~daemon.tfserving.status`: which versions a running server has loaded.

Supervisor side: the protos of ``tensorflow-serving-api`` and protobuf, no TensorFlow.
"""
