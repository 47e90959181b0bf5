"""docker-compose.yml as data: compose's variable interpolation, merges resolved, the services.

No Docker engine here, so the tests read the file the way compose does (`${VAR}`,
`${VAR:-default}`, `${VAR:?error}` from an env file, YAML merge keys) and check or run what it
describes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}; a default may hold
# one level of braces (`${X:-{}}`).
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}")


class MissingVariable(KeyError):
    """A `${NAME:?error}` whose variable is unset (compose refuses to start)."""


def read_env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """KEY=VALUE lines of an env file (comments and blank lines skipped, values verbatim)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def variables(text: str | None = None) -> dict[str, str | None]:
    """Every variable the file interpolates, with its operator (None, ":-", ":?", ...)."""
    text = COMPOSE.read_text() if text is None else text
    return {m.group(1): m.group(2) for m in _VAR.finditer(text)}


def interpolate(value: str, env: Mapping[str, str]) -> str:
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        present = name in env and (env[name] != "" or op is None or not op.startswith(":"))
        if op in (":?", "?") and not present:
            raise MissingVariable(f"{name}: {arg}")
        if op in (":-", "-") and not present:
            return arg
        return env.get(name, "")

    return _VAR.sub(one, value)


def _walk(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_walk(x, env) for x in node]
    if isinstance(node, dict):
        return {k: _walk(v, env) for k, v in node.items()}
    return node


def load(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose document with merges resolved and variables filled from `env`."""
    raw = yaml.safe_load(COMPOSE.read_text())
    return _walk(raw, read_env_file() if env is None else env)


def services(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    return load(env)["services"]


def headwater_services(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The services that run a headwater command (the rest is Kafka, Milvus and friends)."""
    return {n: s for n, s in services(env).items() if (s.get("command") or [""])[0] == "headwater"}


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as strings (compose passes every value as a string)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}
