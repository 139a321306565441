"""Load YAML into plain Python data while remembering where every key and item came from.

Pydantic and our own checks report errors by path (("models", 1, "parameters", "density"));
this module turns such a path back into a line number of the user's file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from mergesmith.errors import MergeError

Path = tuple[str | int, ...]


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def load_with_positions(text: str, source: str) -> tuple[Any, dict[Path, int]]:
    """Parse YAML text; return the data and a map from each path to its 1-based line."""
    documents = load_documents_with_positions(text, source)
    if len(documents) > 1:
        raise MergeError(
            f"{source}: holds {len(documents)} YAML documents where one recipe was expected",
            "a pipeline of stages gives each document a 'name:'",
        )
    return documents[0].data, documents[0].lines


@dataclass(frozen=True)
class Document:
    data: Any
    lines: dict[Path, int]  # 1-based lines counted from the start of the file
    text: str  # this document's own text


def load_documents_with_positions(text: str, source: str) -> list[Document]:
    """Every YAML document of the text (separated by '---'), each with its lines."""
    try:
        nodes = [n for n in yaml.compose_all(text, Loader=_UniqueKeyLoader) if n is not None]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise MergeError(
            f"{where}: YAML syntax error: {exc.problem}",
            "check indentation and that every list item starts with '- '",
        ) from None
    except yaml.YAMLError as exc:
        raise MergeError(
            f"{source}: YAML syntax error: {exc}", "check the recipe is valid YAML"
        ) from None
    except RecursionError:
        # PyYAML composes recursively; thousands of nested brackets exhaust the stack.
        raise MergeError(
            f"{source}: the recipe is nested too deeply to read", "a recipe needs a few levels"
        ) from None
    if not nodes:
        raise MergeError(f"{source}: the recipe is empty", "start with 'merge_method: ties'")
    if len(nodes) > MAX_DOCUMENTS:
        raise MergeError(
            f"{source}: holds {len(nodes)} YAML documents, more than {MAX_DOCUMENTS}",
            "a pipeline needs a few stages",
        )
    all_lines = text.splitlines(keepends=True)
    separators = [i for i, line in enumerate(all_lines) if line.startswith("---")]
    out = []
    for i, node in enumerate(nodes):
        lines: dict[Path, int] = {}
        data = _Converter(source, lines).convert(node, ())
        first = node.start_mark.line
        begin = max((k + 1 for k in separators if k < first), default=0) if i else 0
        following = nodes[i + 1].start_mark.line if i + 1 < len(nodes) else len(all_lines)
        end = max((k for k in separators if first <= k < following), default=following)
        out.append(Document(data, lines, "".join(all_lines[begin:end])))
    return out


_STR = "tag:yaml.org,2002:str"
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

# A recipe is a few hundred values; these bounds stop hostile YAML (alias bombs, cycles,
# thousands of nested brackets) long before it costs time or memory.
MAX_DEPTH = 32
MAX_NODES = 200_000
MAX_DOCUMENTS = 64


class _Converter:
    def __init__(self, source: str, lines: dict[Path, int]) -> None:
        self.source = source
        self.lines = lines
        self.nodes = 0
        self.open: set[int] = set()  # nodes being converted: an alias to one is a cycle

    def fail(self, node: yaml.Node, problem: str, hint: str | None = None) -> MergeError:
        return MergeError(f"{self.source}:{node.start_mark.line + 1}: {problem}", hint)

    def convert(self, node: yaml.Node, path: Path) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.fail(node, "the recipe expands to too many values (an alias bomb?)")
        if len(path) > MAX_DEPTH:
            raise self.fail(node, f"the recipe is nested more than {MAX_DEPTH} levels deep")
        if id(node) in self.open:
            raise self.fail(node, "an alias refers to a node that contains it", "remove the loop")
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node)
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, path)
            return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
        finally:
            self.open.discard(id(node))

    def mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise self.fail(
                    key_node, "YAML merge keys ('<<') are not supported", "write the keys out"
                )
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.fail(key_node, "a key must be a plain name, not a list or mapping")
            key = self.scalar(key_node)
            key = key if isinstance(key, str) else str(key)
            if key in out:
                raise self.fail(
                    key_node,
                    f"key '{key}' appears twice",
                    "keep one of them: YAML would silently use the last",
                )
            child = (*path, key)
            self.lines[child] = key_node.start_mark.line + 1
            out[key] = self.convert(value_node, child)
        return out

    def scalar(self, node: yaml.ScalarNode) -> Any:
        if node.tag == _STR and node.style is None and _EXPONENT_FLOAT.fullmatch(node.value):
            # YAML 1.1 wants a dot in a float, so `1e-5` would be the string '1e-5'; YAML 1.2
            # and mergekit read it as the number that recipes mean by it.
            return float(node.value)
        constructor = yaml.SafeLoader("")
        try:
            return constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            # e.g. an integer longer than Python converts, or a malformed timestamp.
            reason = str(exc).splitlines()[0][:120]
            raise self.fail(node, f"value cannot be read ({reason})") from None
        finally:
            constructor.dispose()


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of the deepest known prefix of `path`."""
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None
