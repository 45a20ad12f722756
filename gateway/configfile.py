"""Where in ``config.yaml`` a configuration error is: ``path:line: what``, one line.

YAML's own errors carry their position. A value the parser refuses is found again by the
dotted key its message names (``server.port``, ``upstreams.openai.timeout_s``,
``unknown keys in server: prot``): the YAML is composed once more into nodes, which know their
lines. A message that names no key of the file (a value from the environment) keeps the file
name alone.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

_UNKNOWN = re.compile(r"unknown (?:config )?keys(?: in ([^:]+))?: (.+)")


def yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    return f"{where}: malformed YAML: {problem}"


def key_lines(text: str) -> dict[str, int]:
    """Every key of the document, dotted (``models.gpt-4o.upstream``), and its line (from 1)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = f"{prefix}{key.value}"
                lines.setdefault(name, key.start_mark.line + 1)
                walk(value, name + ".")

    if root is not None:
        walk(root, "")
    return lines


def located(path: Path, text: str, message: str) -> str:
    """``message`` prefixed with ``path:line`` of the key it names (the most precise one)."""
    lines = key_lines(text)
    candidates = [k for k in lines if re.search(rf"(?<![\w.-]){re.escape(k)}(?![\w-])", message)]
    unknown = _UNKNOWN.search(message)
    if unknown:
        prefix = f"{unknown.group(1).strip()}." if unknown.group(1) else ""
        for name in unknown.group(2).split(","):
            if f"{prefix}{name.strip()}" in lines:
                candidates.append(f"{prefix}{name.strip()}")
    if not candidates:
        return f"{path}: {message}"
    key = max(candidates, key=lambda k: (k.count("."), len(k)))
    return f"{path}:{lines[key]}: {message}"
