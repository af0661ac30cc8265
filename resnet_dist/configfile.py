"""The config as a YAML file: read (UTF-8, no key given twice, a mapping), and written with each key's doc beside
it (--print-config, --help)."""

from __future__ import annotations

import dataclasses
import os

import yaml

from .errors import ConfigError, first_line


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice: PyYAML would keep the last one silently (a second
    `train:` section drops every key of the first)."""

    def construct_document(self, node):
        _refuse_repeated_keys(node, {}, "", set())
        return super().construct_document(node)


class RepeatedKey(yaml.YAMLError):
    pass


def _refuse_repeated_keys(node, seen: dict, prefix: str, visited: set) -> None:
    """Every key by its dotted name (so `train.lr:` and `lr:` under `train:` are the same key) -> its line."""
    if id(node) in visited:  # an alias of a node already walked (or a recursive one)
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: overriding merged keys is its purpose
                continue
            name = f"{prefix}{key.value}" if isinstance(key, yaml.ScalarNode) else None
            if name is not None:
                line = key.start_mark.line + 1
                if name in seen:
                    raise RepeatedKey(
                        f"key '{name}' is given twice (lines {seen[name]} and {line}): keep one"
                    )
                seen[name] = line
            _refuse_repeated_keys(value, seen, f"{name}." if name else prefix, visited)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_repeated_keys(item, {}, prefix, visited)


def read_yaml(path: str) -> dict:
    """A config file's mapping; anything else (unreadable, not UTF-8 text, not YAML, a repeated key, not a
    mapping) is a ConfigError in one line."""
    path = os.path.expanduser(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file (not UTF-8): give a YAML file") from None
    except RepeatedKey as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def to_yaml(cfg, docs: bool = False) -> str:
    """The config as YAML; `docs`: each key's one-line doc (and its allowed values) as a comment beside it."""
    if not docs:
        return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    lines = []

    def walk(node, indent: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:")
                walk(value, indent + "  ")
                continue
            text = yaml.safe_dump([value], default_flow_style=True, width=1000).strip()[1:-1]
            named = f.metadata.get("choices") or ()
            said = all(str(c) in f.metadata["doc"] for c in named)  # a doc that names them needs no list
            choices = f" ({' | '.join(map(str, named))})" if named and not said else ""
            lines.append((f"{indent}{f.name}: {text}", f"# {f.metadata['doc']}{choices}"))

    walk(cfg, "")
    width = max(len(x[0]) for x in lines if isinstance(x, tuple)) + 2
    return "".join((f"{x[0]:<{width}}{x[1]}" if isinstance(x, tuple) else x) + "\n" for x in lines)
