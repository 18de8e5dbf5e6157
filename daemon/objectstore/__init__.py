"""Object stores (``gs://``, ``s3://``): URLs, one client interface, its backends.

- :mod:`~daemon.objectstore.url`: :class:`ObjectURL`, parsing and joining.
- :mod:`~daemon.objectstore.client`: the :class:`ObjectStore` interface every
  backend implements, what it returns and the errors it raises.
- :mod:`~daemon.objectstore.s3` (boto3) and :mod:`~daemon.objectstore.gcs`
  (google-cloud-storage): the backends, each an optional extra.
- :mod:`~daemon.objectstore.clients`: :func:`client_for`, which picks and
  caches a backend for a URL and says which extra to install when it is missing.

Supervisor side: no TensorFlow. The base path on an object store is
:mod:`daemon.basepath.objects`; a checkpoint directory on one is watched by
listing (:mod:`daemon.sources.remote`).
"""
