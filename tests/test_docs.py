"""The documented configuration matches the code."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from daemon.config.images import SCHEMA as IMAGE_SCHEMA
from daemon.config.loading import DAEMON_SCHEMA, MODEL_SCHEMA, parse_config
from daemon.config.serving import SERVING_SCHEMA
from daemon.rules.gate import GATE_SCHEMA
from daemon.sources import SOURCES

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"


def test_example_config_is_valid() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    cfg = parse_config(data, str(EXAMPLE), ROOT)
    assert [m.name for m in cfg.models] == ["my_model"]


def test_every_config_key_is_documented_in_the_example() -> None:
    text = EXAMPLE.read_text()
    # Keys may be commented out (optional tables), so look for "key =" anywhere.
    documented = set(re.findall(r"^[#\s]*([a-z][a-z0-9_]*)\s*=", text, re.M))
    documented |= {"signature"} if "[models.signature]" in text else set()
    documented |= {"gate"} if "[models.gate]" in text else set()
    documented |= {"image_preprocessing"} if "[models.image_preprocessing]" in text else set()
    source_options = {k for kind in SOURCES.values() for k in kind.options} | set(GATE_SCHEMA)
    source_options |= set(SERVING_SCHEMA) | set(IMAGE_SCHEMA)
    missing = (set(DAEMON_SCHEMA) | set(MODEL_SCHEMA) | source_options) - documented
    assert not missing, f"config.example.toml does not document {sorted(missing)}"
    unknown = documented - set(DAEMON_SCHEMA) - set(MODEL_SCHEMA) - source_options - {"inputs"}
    assert not unknown, f"config.example.toml documents keys the code does not know: {unknown}"


def test_every_config_key_is_in_the_readme_tables() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = [ln for ln in readme.splitlines() if ln.startswith("| `")]
    named = {
        k
        for ln in rows
        for k in re.findall(r"`\[?(?:models\.)?([a-z][a-z0-9_]*)\]?`", ln.split("|")[1])
    }
    missing = (set(DAEMON_SCHEMA) | set(MODEL_SCHEMA) | set(SERVING_SCHEMA)) - named
    assert not missing, f"README.md's key tables lack {sorted(missing)}"
    # Source options are described with their source, in backticks.
    options = {k for kind in SOURCES.values() for k in kind.options}
    assert not {k for k in options if f"`{k}`" not in readme}


def test_every_toml_snippet_in_the_readme_is_a_valid_config() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 4
    sources = set()
    for block in blocks:
        cfg = parse_config(tomllib.loads(block), "README.md", ROOT)
        sources |= {m.source for m in cfg.models}
    assert sources >= set(SOURCES) - {"tf_checkpoint"}  # one snippet per other format


def test_the_readme_module_table_names_every_module() -> None:
    """Each module of daemon/ has a row (or is listed in one) in the README's module table."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("Where each piece lives") : text.index("### Which checkpoints count")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    cells = " ".join(row.split("|")[1] for row in rows)
    missing = []
    for path in sorted((ROOT / "daemon").rglob("*.py")):
        rel = path.relative_to(ROOT / "daemon")
        if rel.name in ("__init__.py", "__main__.py") or rel.parts[0] == "demo":
            continue
        # A row names the module by its path, or a folder's row lists it by file name.
        if f"`{rel.as_posix()}`" not in cells and f"`{rel.name}`" not in cells:
            missing.append(rel.as_posix())
    assert missing == []
