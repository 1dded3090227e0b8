"""Config files that extend other config files: the ``_base_`` key.

A config may start with ``_base_: FILE`` or ``_base_: [FILE, ...]``, each path relative to the config itself. The
config is then its bases, in order, with its own keys over them: mappings merge key by key, all the way down; a list
or a scalar replaces the base's value whole (a row that changes one callback restates the ``callbacks`` list). A base
may have bases of its own. Every command that reads a config file reads it through :func:`load_config`; the
LightningCLI commands get the merged YAML in place of the file (:func:`expand_config_args`).

:func:`null_arguments_as_configs` works around the parser reading ``--model.init_args.network.init_args.weights=null``
as the string ``"None"`` (an option inside the arguments of a class nested in another class's arguments): such an
argument is given to the parser as the equivalent one-key YAML config instead, at the same place in the command.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "BASE_KEY",
    "ConfigFileError",
    "config_sources",
    "expand_config_args",
    "load_config",
    "merge_configs",
    "null_arguments_as_configs",
]

#: The top-level key that names a config's bases.
BASE_KEY = "_base_"


class ConfigFileError(ValueError):
    """A config file, or one of its bases, is missing, not a YAML mapping, or extends itself."""


class _Loader(yaml.SafeLoader):
    """YAML as the CLI's parser reads it: ``1e-4`` is a number, as in YAML 1.2 (PyYAML alone reads a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a safe loader)


def merge_configs(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` over it: mappings merge recursively, other values (lists too) replace.

    Neither argument is modified.
    """
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_mapping(path: Path, named_by: Path | None) -> dict[str, Any]:
    where = f" (the {BASE_KEY} of {named_by})" if named_by is not None else ""
    if not path.is_file():
        raise ConfigFileError(f"config file {path}{where} does not exist")
    try:
        content = _parse(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigFileError(f"config file {path}{where} is not valid YAML: {error}") from error
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigFileError(f"config file {path}{where}: expected a mapping at the top level")
    return content


def _load(
    path: Path, named_by: Path | None, chain: tuple[Path, ...], sources: dict[Path, int]
) -> dict[str, Any]:
    """The merged config of ``path``; every file read is recorded in ``sources`` with its depth below the first."""
    key = path.resolve()
    if key in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(key) :], key))
        raise ConfigFileError(f"config file {path} extends itself through {BASE_KEY}: {cycle}")
    content = _read_mapping(path, named_by)
    sources.setdefault(path, len(chain))
    bases = content.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigFileError(
            f"config file {path}: `{BASE_KEY}` must be a file name or a list of file names (relative to {path.parent})"
        )
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge_configs(merged, _load(path.parent / base, path, (*chain, key), sources))
    return merge_configs(merged, content)


def load_config(path: str | Path) -> dict[str, Any]:
    """The config a YAML file gives, its ``_base_`` files resolved (see the module's docstring).

    Raises:
        ConfigFileError: Naming the file, when the file or a base is missing, is not a YAML mapping, or the bases
            form a cycle.
    """
    return _load(Path(path), None, (), {})


def config_sources(path: str | Path) -> list[Path]:
    """The files a config is made of: the file itself, then its bases and theirs, each once.

    Raises:
        ConfigFileError: As :func:`load_config`.
    """
    sources: dict[Path, int] = {}
    _load(Path(path), None, (), sources)
    return sorted(sources, key=sources.__getitem__)  # by depth; in the order the bases are named


def _expanded(value: str) -> str:
    """A ``--config`` value with its bases resolved: the merged YAML for a file that has ``_base_``, else as given."""
    path = Path(value)
    if not path.is_file():
        return value  # a YAML string, or a missing file that the parser reports
    try:
        content = _parse(path.read_text())
    except yaml.YAMLError:
        return value  # the parser reports it
    if not isinstance(content, dict) or BASE_KEY not in content:
        return value
    return yaml.safe_dump(load_config(path), sort_keys=False)


def expand_config_args(args: Sequence[str]) -> list[str]:
    """Command-line arguments with each ``--config FILE`` (or ``-c FILE``, ``--config=FILE``) whose file has
    ``_base_`` replaced by the merged YAML, which LightningCLI's ``--config`` takes as well as a file name."""
    expanded = list(args)
    for index, token in enumerate(expanded):
        name, equals, value = token.partition("=")
        if name not in ("-c", "--config"):
            continue
        if equals:
            expanded[index] = f"{name}={_expanded(value)}"
        elif index + 1 < len(expanded):
            expanded[index + 1] = _expanded(expanded[index + 1])
    return expanded


def _null_config(key: str) -> str:
    """``a.b.c`` -> the YAML (as JSON) ``{"a": {"b": {"c": null}}}``."""
    config: Any = None
    for part in reversed(key.split(".")):
        config = {part: config}
    return json.dumps(config)


def null_arguments_as_configs(args: Sequence[str]) -> list[str]:
    """Command-line arguments with each ``--KEY=null`` (or ``--KEY null``) whose key passes through ``init_args``
    replaced by ``--config`` with the one-key YAML that sets it to null, which the parser reads as ``None`` (given on
    the command line, a nested class's ``str | None`` option would become the string ``"None"``). A later argument
    still overrides it, as the original would have been overridden."""
    converted: list[str] = []
    index = 0
    while index < len(args):
        token = args[index]
        name, equals, value = token.partition("=")
        nested = name.startswith("--") and ".init_args." in name
        if nested and equals and value == "null":
            converted.append(f"--config={_null_config(name[2:])}")
        elif nested and not equals and index + 1 < len(args) and args[index + 1] == "null":
            converted.append(f"--config={_null_config(name[2:])}")
            index += 1
        else:
            converted.append(token)
        index += 1
    return converted
