"""Configuration: one TOML file, a ``[daemon]`` table and ``[[models]]`` tables.

Contract: :func:`load_config` returns a fully validated, immutable
:class:`Config` or raises :class:`ConfigError` listing *every* problem, each
naming the file and the key (``models[1] (resnet).keep_versions``) and saying what is
expected. Relative paths are resolved against the config file's folder, so a
config means the same thing whatever the working directory.

Validation is hand-written rather than a schema library: the schema is small,
and this keeps the supervisor's dependency set to what the product needs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from daemon.basepath.layout import MAX_WARMUP_RECORDS
from daemon.config.images import ImagePreprocessing
from daemon.config.images import parse as parse_images
from daemon.config.schema import (
    REQUIRED,
    Schema,
    apply_schema,
    command_line,
    non_negative,
    nonempty,
    one_of,
    positive,
)
from daemon.config.serving import ServingConfig, parse_serving
from daemon.objectstore.url import Location, parse_url, url_scheme
from daemon.rules.gate import GATE_SCHEMA, Gate, parse_gate
from daemon.rules.labels import parse_promote
from daemon.sources import SOURCES

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
BUILDER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
EXPORT_POLICIES = ("latest", "all")
VERSION_POLICIES = ("increment", "step")
#: Largest synthetic_image_size: a float32 RGB image of 4096x4096 is 192 MiB.
MAX_SYNTHETIC_IMAGE_SIZE = 4096
# dtypes a synthesised signature input may have (tf.dtypes names).
DTYPES = (
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "bool",
    "string",
)
#: worker_io_class values: ioprio classes, or "default" to leave it alone.
IO_CLASSES = ("idle", "best-effort", "default")
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9725"
#: Serving signatures a traced model can get, as the Model Garden exporters
#: name them: the model's own inputs, uint8 images, encoded image bytes, or
#: serialized tf.train.Example.
INPUT_TYPES = ("default", "image_tensor", "encoded_image", "tf_example")
#: What a promote_command may name: {model}, {version}, {base_path}.
PROMOTE_PLACEHOLDERS = ("model", "version", "base_path")


class ConfigError(Exception):
    """The config is invalid. ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"invalid config {source}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One serving input for builders that do not provide a serving function."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)  # no slots: the schema reads the class attributes as defaults
class DaemonConfig:
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    log_format: str = "auto"
    log_level: str = "info"
    rescan_interval_seconds: float = 30.0
    export_timeout_seconds: float = 1800.0
    concurrency: int = 1
    allow_gpu: bool = False
    worker_nice: int = 19
    worker_io_class: str = "idle"
    worker_threads: int = 0
    warm_workers: bool = True
    exporter_max_exports: int = 20
    exporter_idle_seconds: float = 1800.0
    keep_failed: int = 3
    retry_backoff_seconds: float = 30.0
    shutdown_grace_seconds: float = 60.0
    health_stall_seconds: float = 120.0
    health_failing_seconds: float = 21600.0
    object_store_poll_seconds: float = 10.0
    s3_endpoint_url: str = ""

    @property
    def worker_threads_effective(self) -> int:
        """``worker_threads``, with 0 meaning a quarter of the CPUs (at least 1)."""
        if self.worker_threads:
            return self.worker_threads
        return max(1, (os.cpu_count() or 1) // 4)

    @property
    def metrics_host_port(self) -> tuple[str, int] | None:
        if not self.metrics_address:
            return None
        host, _, port = self.metrics_address.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)  # no slots: the schema reads the class attributes as defaults
class ModelConfig:
    name: str
    checkpoint_dir: Location
    base_path: Location
    builder: str = ""
    source: str = "tf_checkpoint"
    python_path: tuple[Path, ...] = ()
    #: Another interpreter that runs this model's export worker (the trainer's
    #: environment); None: the daemon's own (daemon/config/interpreters.py).
    worker_python: Path | None = None
    checkpoint_key: str = "model"
    export_policy: str = "latest"
    version_policy: str = "increment"
    keep_versions: int = 5
    #: Let every SignatureDef change through the signature contract (rules/signatures.py).
    allow_signature_change: bool = False
    min_interval_seconds: float = 0.0
    rtol: float = 1e-4
    atol: float = 1e-5
    signature: tuple[InputSpec, ...] = ()
    input_type: str = "default"
    #: What image inputs' pixels become (daemon/config/images.py); None: not an image input.
    image_preprocessing: ImagePreprocessing | None = None
    sample_inputs: Path | None = None
    golden_outputs: Path | None = None
    warmup_records: int = 0
    #: Height and width of a synthesised image input of unknown size (children/samples.py).
    synthetic_image_size: int = 224
    incremental_export: bool = True
    #: With [serving_config]: when a canary version becomes stable (rules/labels.py).
    promote: str = "immediately"
    promote_command: tuple[str, ...] = ()
    gate: Gate = field(default_factory=Gate)
    #: The validated ``[models.<source>]`` table (defaults filled in; JSON-able).
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Config:
    path: Path | None
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    models: tuple[ModelConfig, ...] = ()
    #: TF Serving's model config file and version labels; None: not written.
    serving: ServingConfig | None = None


# --- the schema -------------------------------------------------------------


def _address(v: Any) -> str | None:
    if v == "":
        return None
    host, sep, port = v.rpartition(":")
    # isascii(): str.isdigit() also accepts "²" (int() refuses it) and "٣" (int() takes it).
    ok_port = port.isascii() and port.isdigit()
    if not sep or not host or not ok_port or not 0 <= int(port) <= 65535:
        return 'must be "host:port" (for example "127.0.0.1:9725"), or "" to disable'
    return None


def _name(v: Any) -> str | None:
    # fullmatch, not match: "$" also matches before a trailing newline ("model\n").
    if NAME_RE.fullmatch(v):
        return None
    return "must match [A-Za-z0-9._-]+ (TF Serving model name)"


def _nice(v: Any) -> str | None:
    return None if 0 <= v <= 19 else "must be a niceness from 0 (unchanged) to 19 (lowest)"


#: The Python module each object-store scheme's client is imported from.
CLIENT_MODULES = {"gs": "google.cloud.storage", "s3": "boto3"}


def _location(v: Any) -> str | None:
    """A local path or a ``gs://`` / ``s3://`` URL; any other URL is refused.

    (Without this, ``hdfs://x`` would become a folder named ``hdfs:`` here.)
    """
    if not v:
        return "must not be empty"
    if url_scheme(v) is None:
        return None
    try:
        url = parse_url(v)
    except ValueError as e:
        return f"{e}; or give a local folder"
    if not _importable(CLIENT_MODULES[url.scheme]):
        return (
            f"{url.scheme}:// needs {CLIENT_MODULES[url.scheme]}, which is not installed: "
            f"pip install 'ckpt-exporter[{url.extra}]'"
        )
    return None


def _importable(module: str) -> bool:
    # find_spec finds a module without importing it; for a dotted name it
    # imports the parents, and raises when one of them is missing.
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _endpoint(v: Any) -> str | None:
    if v == "" or re.fullmatch(r"https?://[^\s/]+(/\S*)?", v):
        return None
    return 'must be an http:// or https:// URL (for example "https://minio.internal:9000"), or ""'


def _builder(v: Any) -> str | None:
    if v == "" or BUILDER_RE.fullmatch(v):
        return None
    return 'must be "module:function", for example "mytrainer.model:build_model"'


def _warmup_records(v: Any) -> str | None:
    if 0 <= v <= MAX_WARMUP_RECORDS:
        return None
    n = MAX_WARMUP_RECORDS
    return f"must be from 0 (none) to {n} (TF Serving reads at most {n})"


def _image_size(v: Any) -> str | None:
    if 1 <= v <= MAX_SYNTHETIC_IMAGE_SIZE:
        return None
    return f"must be from 1 to {MAX_SYNTHETIC_IMAGE_SIZE} (pixels)"


DAEMON_SCHEMA: Schema = {
    "metrics_address": ((str,), DaemonConfig.metrics_address, _address),
    "log_format": ((str,), DaemonConfig.log_format, one_of(*LOG_FORMATS)),
    "log_level": ((str,), DaemonConfig.log_level, one_of(*LOG_LEVELS)),
    "rescan_interval_seconds": ((int, float), DaemonConfig.rescan_interval_seconds, positive),
    "export_timeout_seconds": ((int, float), DaemonConfig.export_timeout_seconds, positive),
    "concurrency": ((int,), DaemonConfig.concurrency, positive),
    "allow_gpu": ((bool,), DaemonConfig.allow_gpu, None),
    "worker_nice": ((int,), DaemonConfig.worker_nice, _nice),
    "worker_io_class": ((str,), DaemonConfig.worker_io_class, one_of(*IO_CLASSES)),
    "worker_threads": ((int,), DaemonConfig.worker_threads, non_negative),
    "warm_workers": ((bool,), DaemonConfig.warm_workers, None),
    "exporter_max_exports": ((int,), DaemonConfig.exporter_max_exports, positive),
    "exporter_idle_seconds": ((int, float), DaemonConfig.exporter_idle_seconds, positive),
    "keep_failed": ((int,), DaemonConfig.keep_failed, non_negative),
    "retry_backoff_seconds": ((int, float), DaemonConfig.retry_backoff_seconds, positive),
    "shutdown_grace_seconds": ((int, float), DaemonConfig.shutdown_grace_seconds, non_negative),
    "health_stall_seconds": ((int, float), DaemonConfig.health_stall_seconds, positive),
    "health_failing_seconds": ((int, float), DaemonConfig.health_failing_seconds, positive),
    "object_store_poll_seconds": ((int, float), DaemonConfig.object_store_poll_seconds, positive),
    "s3_endpoint_url": ((str,), DaemonConfig.s3_endpoint_url, _endpoint),
}

MODEL_SCHEMA: Schema = {
    "name": ((str,), REQUIRED, _name),
    "checkpoint_dir": ((str,), REQUIRED, _location),
    "base_path": ((str,), REQUIRED, _location),
    "source": ((str,), ModelConfig.source, one_of(*SOURCES)),
    "builder": ((str,), "", _builder),
    "python_path": ((list,), [], None),
    "worker_python": ((str,), "", None),
    "checkpoint_key": ((str,), ModelConfig.checkpoint_key, nonempty),
    "export_policy": ((str,), ModelConfig.export_policy, one_of(*EXPORT_POLICIES)),
    "version_policy": ((str,), ModelConfig.version_policy, one_of(*VERSION_POLICIES)),
    "keep_versions": ((int,), ModelConfig.keep_versions, non_negative),
    "allow_signature_change": ((bool,), ModelConfig.allow_signature_change, None),
    "min_interval_seconds": ((int, float), ModelConfig.min_interval_seconds, non_negative),
    "rtol": ((int, float), ModelConfig.rtol, non_negative),
    "atol": ((int, float), ModelConfig.atol, non_negative),
    "signature": ((dict,), {}, None),
    "input_type": ((str,), ModelConfig.input_type, one_of(*INPUT_TYPES)),
    "image_preprocessing": ((dict,), {}, None),
    "sample_inputs": ((str,), "", None),
    "golden_outputs": ((str,), "", None),
    "warmup_records": ((int,), 0, _warmup_records),
    "synthetic_image_size": ((int,), ModelConfig.synthetic_image_size, _image_size),
    "incremental_export": ((bool,), ModelConfig.incremental_export, None),
    "promote": ((str,), ModelConfig.promote, parse_promote),
    "promote_command": ((list,), [], command_line(*PROMOTE_PLACEHOLDERS)),
    "gate": ((dict,), {}, None),
}


def _parse_signature(table: Mapping[str, Any], where: str, problems: list[str]) -> list[InputSpec]:
    specs: list[InputSpec] = []
    for key in table:
        if key != "inputs":
            problems.append(f"{where}.{key}: unknown key; known keys are inputs")
    inputs = table.get("inputs", {})
    if not isinstance(inputs, dict):
        problems.append(f"{where}.inputs: must be a table of name = {{ dtype, shape }}")
        return specs
    for name, spec in inputs.items():
        w = f"{where}.inputs.{name}"
        if not isinstance(spec, dict):
            problems.append(f'{w}: must be a table like {{ dtype = "float32", shape = [-1, 4] }}')
            continue
        for k in spec:
            if k not in ("dtype", "shape"):
                problems.append(f"{w}.{k}: unknown key; known keys are dtype, shape")
        dtype = spec.get("dtype")
        if dtype not in DTYPES:
            problems.append(f"{w}.dtype: must be one of {', '.join(DTYPES)} (got {dtype!r})")
            continue
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape
        ):
            problems.append(
                f"{w}.shape: must be a list of integers, -1 for an unknown size (got {shape!r})"
            )
            continue
        specs.append(InputSpec(name, dtype, tuple(None if d == -1 else d for d in shape)))
    return specs


def _source_options(
    table: Mapping[str, Any],
    values: Mapping[str, Any],
    where: str,
    problems: list[str],
    resolve: Callable[[str], Path],
) -> dict[str, Any] | None:
    """The validated ``[models.<source>]`` table of one model, or None if invalid."""
    kind = SOURCES[values["source"]]
    n = len(problems)
    for other in SOURCES:
        if other != kind.name and other in table:
            problems.append(
                f"{where}.{other}: options for source = {other!r}, but this model's source "
                f"is {kind.name!r}; remove the table or change source"
            )
    if kind.builder == "unused" and values["builder"]:
        problems.append(f"{where}.builder: not used by source = {kind.name!r}; remove it")
    raw = table.get(kind.name, {})
    if not isinstance(raw, dict):
        problems.append(f"{where}.{kind.name}: must be a table ([models.{kind.name}])")
        return None
    sub = f"{where}.{kind.name}"
    options = apply_schema(raw, kind.options, sub, problems)
    if len(problems) > n:
        return None
    if kind.check is not None:
        problems.extend(f"{sub}.{p}" for p in kind.check(options, bool(values["builder"])))
    for key in kind.path_keys:
        if options.get(key):
            options[key] = str(resolve(options[key]))
    return options if len(problems) == n else None


def _validation_files(
    values: Mapping[str, Any], where: str, problems: list[str], resolve: Callable[[str], Path]
) -> dict[str, Any]:
    """``sample_inputs`` and ``golden_outputs`` resolved and present; ``warmup_records`` usable."""
    out: dict[str, Any] = {"warmup_records": values["warmup_records"]}
    for key in ("sample_inputs", "golden_outputs"):
        out[key] = resolve(values[key]) if values[key] else None
        if out[key] is not None and not out[key].is_file():
            problems.append(
                f"{where}.{key}: {out[key]} is not a file; give an .npz written by numpy.savez "
                "(one array per signature input or output)"
            )
    if out["golden_outputs"] is not None and out["sample_inputs"] is None:
        problems.append(
            f"{where}.golden_outputs: needs sample_inputs, the inputs these outputs answer"
        )
    # find_spec of a top-level package looks for it without importing it (and TensorFlow).
    if values["warmup_records"] and importlib.util.find_spec("tensorflow_serving") is None:
        problems.append(
            f"{where}.warmup_records: needs the tensorflow-serving-api protos, which are not "
            "installed: pip install tensorflow-serving-api (or set it to 0)"
        )
    return out


def _interpreter(value: str, root: Path) -> Path | None:
    """``worker_python`` made absolute, but not resolved: a venv's ``bin/python`` is a
    symlink to the base interpreter, and only the venv's own path starts it as the venv.
    """
    if not value:
        return None
    return Path(os.path.abspath(root / Path(value).expanduser()))


def parse_config(data: Mapping[str, Any], source: str, root: Path) -> Config:
    """Validate parsed TOML ``data``; relative paths resolve against ``root``."""
    problems: list[str] = []
    for key in data:
        if key not in ("daemon", "models", "serving_config"):
            problems.append(
                f"{key}: unknown top-level key; expected [daemon], [[models]] and [serving_config]"
            )
    daemon_table = data.get("daemon", {})
    if not isinstance(daemon_table, dict):
        problems.append("daemon: must be a table ([daemon])")
        daemon_table = {}
    daemon = DaemonConfig(**apply_schema(daemon_table, DAEMON_SCHEMA, "daemon", problems))

    models_raw = data.get("models", [])
    if not isinstance(models_raw, list) or not all(isinstance(m, dict) for m in models_raw):
        problems.append("models: must be an array of tables ([[models]])")
        models_raw = []
    if not models_raw:
        problems.append("models: no [[models]] table; add one per watched model")

    def resolve(p: str) -> Path:
        path = Path(p).expanduser()
        return (path if path.is_absolute() else root / path).resolve()

    def locate(p: str) -> Location:
        if url_scheme(p) is None:
            return resolve(p)
        url = parse_url(p)  # checked by the schema
        return replace(url, endpoint=daemon.s3_endpoint_url) if url.scheme == "s3" else url

    models: list[ModelConfig] = []
    for i, table in enumerate(models_raw):
        where = f"models[{i}]"
        if isinstance(table.get("name"), str):
            where += f" ({table['name']})"
        # [models.<source>] tables hold the options of the chosen source.
        own = {k: v for k, v in table.items() if k not in SOURCES}
        values = apply_schema(own, MODEL_SCHEMA, where, problems)
        kind = SOURCES.get(values.get("source", ""))
        if kind is not None and kind.builder == "required" and not own.get("builder"):
            problems.append(
                f"{where}.builder: missing (required) with source = {kind.name!r}: "
                'give "module:function" returning the model to restore'
            )
        if len(values) != len(MODEL_SCHEMA):
            continue  # a required key is missing or invalid: reported already
        options = _source_options(table, values, where, problems, resolve)
        if options is None:
            continue
        if values["input_type"] != "default" and SOURCES[values["source"]].builder == "unused":
            problems.append(
                f"{where}.input_type: only for sources that export a Keras model or tf.Module "
                f"(tf_checkpoint, keras), not source = {values['source']!r}; remove it"
            )
            continue
        pp = values["python_path"]
        if not all(isinstance(x, str) for x in pp):
            problems.append(f"{where}.python_path: must be a list of folder paths (strings)")
            continue
        sig = _parse_signature(values["signature"], f"{where}.signature", problems)
        n = len(problems)
        images = parse_images(values["image_preprocessing"], values["input_type"], where, problems)
        checks = _validation_files(values, where, problems, resolve)
        gate_values = apply_schema(values["gate"], GATE_SCHEMA, f"{where}.gate", problems)
        if len(problems) > n:
            continue
        checkpoint_dir = locate(values["checkpoint_dir"])
        if not isinstance(checkpoint_dir, Path) and not SOURCES[values["source"]].remote_dirs:
            remote = sorted(k for k, v in SOURCES.items() if v.remote_dirs)
            problems.append(
                f"{where}.checkpoint_dir: source = {values['source']!r} reads local folders "
                f"only; sources that read gs:// and s3:// are {', '.join(remote)}"
            )
            continue
        gate, gate_problems = parse_gate(
            gate_values, set(values["gate"]), f"{where}.gate", checkpoint_dir
        )
        problems.extend(gate_problems)
        values.update(
            worker_python=_interpreter(values["worker_python"], root),
            checkpoint_dir=checkpoint_dir,
            base_path=locate(values["base_path"]),
            python_path=tuple(resolve(x) for x in pp),
            signature=tuple(sig),
            min_interval_seconds=float(values["min_interval_seconds"]),
            rtol=float(values["rtol"]),
            atol=float(values["atol"]),
            options=options,
            gate=gate,
            image_preprocessing=images,
            **checks,
        )
        values["promote_command"] = tuple(values["promote_command"])
        m = ModelConfig(**values)
        if m.promote == "command" and not m.promote_command:
            problems.append(
                f'{where}.promote_command: missing with promote = "command": give the argv '
                "that approves a version by exiting 0 ({model}, {version}, {base_path})"
            )
        if m.checkpoint_dir == m.base_path:
            problems.append(f"{where}.base_path: must differ from checkpoint_dir")
        models.append(m)

    seen_names: dict[str, int] = {}
    seen_bases: dict[Location, str] = {}
    for m in models:
        if m.name in seen_names:
            problems.append(f"models: name {m.name!r} is used twice; names must be unique")
        seen_names[m.name] = 1
        if m.base_path in seen_bases:
            problems.append(
                f"models ({m.name}).base_path: {m.base_path} is also the base path of "
                f"{seen_bases[m.base_path]!r}; each model needs its own base path"
            )
        seen_bases[m.base_path] = m.name

    serving = parse_serving(data.get("serving_config"), problems, locate, resolve, _location)
    if problems:
        raise ConfigError(source, problems)
    return Config(path=None, daemon=daemon, models=tuple(models), serving=serving)


def load_config(path: Path) -> Config:
    """Read and validate the TOML file at ``path``."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found; pass --config PATH"]) from None
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read: {e.strerror}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # TOML files are UTF-8
        raise ConfigError(str(path), [f"not valid TOML: {e}"]) from None
    cfg = parse_config(data, str(path), path.resolve().parent)
    return replace(cfg, path=path.resolve())
