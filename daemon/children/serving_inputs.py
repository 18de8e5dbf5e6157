"""What a served model takes as input: its own tensors, or the Model Garden's kinds.

Runs in the worker child (imports TensorFlow). ``input_type`` of a model:

- ``default``: the model's own inputs (``keras.Input`` specs, a ``tf.Module``'s
  ``input_signature``, or ``[models.signature]``);
- ``image_tensor``: uint8 images ``[batch, height, width, channels]``;
- ``encoded_image``: a batch of JPEG/PNG bytes, decoded (and resized,
  bilinear, to the model's height and width where it has them) in the graph;
- ``tf_example``: a batch of serialized ``tf.train.Example``, parsed in the
  graph; the feature spec is the model's inputs (one feature per input, named
  like it, without the batch dimension), so ``[models.signature]`` sets it.

For both image kinds the pixels, as float32 0..255, go through the model's
``[models.image_preprocessing]`` (:mod:`daemon.config.images`: ``(x * scale -
mean) / std`` per channel, or a ``module:function``) and are cast to the
model's dtype; nothing is assumed when it is missing.

The three kinds take one input named ``inputs``, as Model Garden's vision
exporters name it (``export_base.ExportModule`` with no ``input_name``).
:func:`serving_signature` also makes the example inputs the exporter records
as the reference: valid for the kind (a real PNG, a real serialized Example),
so the validator can replay them through the SignatureDef exactly as a client
would send them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from daemon.children import runtime
from daemon.protocol import ImagePreprocessingSpec

INPUT_KEY = "inputs"


def dims(spec: Any) -> list[int | None]:
    """The dimensions of a ``tf.TensorSpec``, None where unknown."""
    return [None if d is None else int(d) for d in spec.shape]


def serving_signature(
    input_type: str,
    specs: Sequence[Any],
    call: Callable[..., Any],
    preprocessing: ImagePreprocessingSpec | None = None,
    function: Callable[[Any], Any] | None = None,
) -> tuple[list[Any], Callable[..., Any], dict[str, Any]]:
    """The serving input specs, the function to export, and example inputs by name.

    ``specs`` are the model's own ``tf.TensorSpec``s, ``call(*tensors)`` runs
    the model on them. For the image kinds, ``preprocessing`` is the model's
    table and ``function`` its ``function``, imported (see the module docstring).
    """
    import tensorflow as tf

    if input_type == "default":
        feeds = {s.name: runtime.synth_input(s.name, s.dtype.name, dims(s)) for s in specs}
        return list(specs), call, feeds
    if input_type == "tf_example":
        return _tf_example(specs, call)
    if len(specs) != 1 or specs[0].shape.rank != 4:
        raise runtime.ChildFailure(
            "no_signature",
            f"input_type = {input_type!r} needs a model with one image input "
            f"[batch, height, width, channels]; this one takes "
            f"{[(s.name, dims(s)) for s in specs]}",
        )
    (spec,) = specs
    _, h, w, c = dims(spec)
    pixels = _pixels(input_type, spec, preprocessing, function)
    image = _example_image(h or 8, w or 8, c or 3)
    if input_type == "image_tensor":

        def serve_images(images: Any) -> Any:
            return call(pixels(images))

        return (
            [tf.TensorSpec([None, h, w, c], tf.uint8, name=INPUT_KEY)],
            serve_images,
            {INPUT_KEY: image[None]},
        )

    def decode(data: Any) -> Any:
        img = tf.io.decode_image(data, channels=c or 3, expand_animations=False)
        img = tf.cast(img, tf.float32)
        return tf.image.resize(img, [h, w]) if h and w else img

    def serve_encoded(encoded: Any) -> Any:
        images = tf.map_fn(
            decode, encoded, fn_output_signature=tf.TensorSpec([h, w, c], tf.float32)
        )
        return call(pixels(images))

    png = tf.io.encode_png(image).numpy()
    return (
        [tf.TensorSpec([None], tf.string, name=INPUT_KEY)],
        serve_encoded,
        {INPUT_KEY: _bytes_batch(png)},
    )


def _pixels(
    input_type: str,
    spec: Any,
    preprocessing: ImagePreprocessingSpec | None,
    function: Callable[[Any], Any] | None,
) -> Callable[[Any], Any]:
    """The graph function from a batch of pixels to the model's input (module docstring)."""
    import tensorflow as tf

    if preprocessing is None:
        raise runtime.ChildFailure(
            "no_signature",
            f"input_type = {input_type!r} needs [models.image_preprocessing]: what the model "
            "takes instead of the uint8 pixels (scale, mean and std, or function)",
        )
    channels = dims(spec)[3]
    for key in ("mean", "std"):
        n = len(preprocessing[key])
        if n != 1 and channels is not None and n != channels:
            raise runtime.ChildFailure(
                "no_signature",
                f"[models.image_preprocessing] {key} has {n} numbers; the model's image "
                f"input has {channels} channels (give one number, or one per channel)",
            )
    scale = preprocessing["scale"]
    mean = tf.constant(preprocessing["mean"], tf.float32)
    std = tf.constant(preprocessing["std"], tf.float32)

    def pixels(images: Any) -> Any:
        x = tf.cast(images, tf.float32)
        x = function(x) if function is not None else (x * scale - mean) / std
        return tf.cast(x, spec.dtype)

    return pixels


def _example_image(h: int, w: int, c: int) -> Any:
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, size=(h, w, c), dtype=np.uint8)


def _bytes_batch(*items: bytes) -> Any:
    import numpy as np

    return np.array(list(items), dtype=object)


def _tf_example(
    specs: Sequence[Any], call: Callable[..., Any]
) -> tuple[list[Any], Callable[..., Any], dict[str, Any]]:
    import numpy as np
    import tensorflow as tf

    # tf.train.Example holds float, int64 and bytes lists only: parse as
    # those, then cast to what the model takes.
    def wire(dtype: Any) -> Any:
        if dtype.is_floating:
            return tf.float32
        if dtype.is_integer or dtype.is_bool:
            return tf.int64
        return tf.string

    features = {
        s.name: tf.io.FixedLenFeature([d or 1 for d in dims(s)[1:]], wire(s.dtype)) for s in specs
    }

    def serve_examples(serialized: Any) -> Any:
        parsed = tf.io.parse_example(serialized, features)
        return call(*[tf.cast(parsed[s.name], s.dtype) for s in specs])

    example = tf.train.Example()
    for s in specs:
        value = runtime.synth_input(s.name, s.dtype.name, [d or 1 for d in dims(s)[1:]])
        flat = np.asarray(value).reshape(-1)
        feature = example.features.feature[s.name]
        kind = wire(s.dtype)
        if kind == tf.float32:
            feature.float_list.value.extend(flat.astype("float32").tolist())
        elif kind == tf.int64:
            feature.int64_list.value.extend(flat.astype("int64").tolist())
        else:
            feature.bytes_list.value.extend(bytes(x) for x in flat)
    return (
        [tf.TensorSpec([None], tf.string, name=INPUT_KEY)],
        serve_examples,
        {INPUT_KEY: _bytes_batch(example.SerializeToString())},
    )
