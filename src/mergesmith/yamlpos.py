"""Load YAML into plain Python data while remembering where every key and item came from.

Pydantic and our own checks report errors by path (("models", 1, "parameters", "density"));
this module turns such a path back into a line number of the user's file.
"""

from __future__ import annotations

from typing import Any

import yaml

from mergesmith.errors import MergeError

Path = tuple[str | int, ...]


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def load_with_positions(text: str, source: str) -> tuple[Any, dict[Path, int]]:
    """Parse YAML text; return the data and a map from each path to its 1-based line."""
    try:
        node = yaml.compose(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise MergeError(
            f"{where}: YAML syntax error: {exc.problem}",
            "check indentation and that every list item starts with '- '",
        ) from None
    except yaml.YAMLError as exc:
        raise MergeError(f"{source}: YAML syntax error: {exc}", None) from None
    if node is None:
        raise MergeError(f"{source}: the recipe is empty", "start with 'merge_method: ties'")
    lines: dict[Path, int] = {}
    data = _convert(node, (), lines, source)
    return data, lines


def _convert(node: yaml.Node, path: Path, lines: dict[Path, int], source: str) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if not isinstance(key, str):
                key = str(key)
            if key in out:
                raise MergeError(
                    f"{source}:{key_node.start_mark.line + 1}: key '{key}' appears twice",
                    "keep one of them: YAML would silently use the last",
                )
            child = (*path, key)
            lines[child] = key_node.start_mark.line + 1
            out[key] = _convert(value_node, child, lines, source)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), lines, source) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return None
    constructor = yaml.SafeLoader(node.value if isinstance(node.value, str) else "")
    try:
        return constructor.construct_object(node, deep=True)
    finally:
        constructor.dispose()


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of the deepest known prefix of `path`."""
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None
