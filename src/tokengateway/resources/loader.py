"""Reading manifest files the way `kubectl apply -f` takes them.

Deliberate kubectl parity:

* a folder contributes its `.yaml`, `.yml` and `.json` files, sorted by name, *not* recursively
  (kubectl needs `-R` for that); a file named explicitly is read whatever its extension;
* `-` reads standard input;
* multi-document YAML (`---`), empty documents skipped, `kind: List` (and any `*List` with
  `items`) expanded into its items;
* nothing is expanded: `${VAR}` stays as written (the tutorial's shell expands it, kubectl
  does not);
* YAML 1.1 scalars like kubectl's YAML library, except that timestamps stay strings (they do
  in kubectl too, which converts YAML to JSON), and a key repeated in one mapping is an error
  (kubectl rejects it; PyYAML would silently keep the last value).
"""

import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import yaml

from .errors import ManifestError, ManifestIssue

__all__ = ["MANIFEST_EXTENSIONS", "Document", "load_paths"]

MANIFEST_EXTENSIONS = (".yaml", ".yml", ".json")
STDIN_SOURCE = "<stdin>"

_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, slots=True)
class Document:
    """One object from a manifest; `source` is `path#N` (N counts documents from 1)."""

    source: str
    obj: dict[str, Any]


class _Loader(_BaseLoader):  # type: ignore[valid-type,misc]
    """Safe loader that keeps timestamps as text and refuses duplicate keys."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # unhashable key: let PyYAML report it
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {json.dumps(key, default=str)} "
                    f"(first at line {first.start_mark.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def load_paths(paths: Sequence[str], stdin: TextIO | None = None) -> list[Document]:
    """Read every manifest named by `paths`, in order.

    Each entry is a file, a folder (its `.yaml`/`.yml`/`.json` files sorted by name, not
    recursive) or `-` for `stdin` (default `sys.stdin`). Raises `ManifestError` listing every
    unreadable file, YAML/JSON syntax error (with line and column) and non-object document.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]  # one path, not a sequence of one-letter paths
    docs: list[Document] = []
    issues: list[ManifestIssue] = []
    for path in paths:
        for source, text in _read_sources(os.fspath(path), stdin, issues):
            _parse_text(source, text, docs, issues)
    if issues:
        raise ManifestError(issues)
    return docs


def _read_sources(
    path: str, stdin: TextIO | None, issues: list[ManifestIssue]
) -> Iterator[tuple[str, str]]:
    if path == "-":
        yield STDIN_SOURCE, (stdin if stdin is not None else sys.stdin).read()
        return
    if os.path.isdir(path):
        names = sorted(
            n
            for n in os.listdir(path)
            if n.lower().endswith(MANIFEST_EXTENSIONS) and os.path.isfile(os.path.join(path, n))
        )
        files = [os.path.join(path, n) for n in names]
    else:
        files = [path]
    for file in files:
        try:
            with open(file, encoding="utf-8") as fh:
                yield file, fh.read()
        except FileNotFoundError:
            issues.append(ManifestIssue(file, "", "", "", "no such file or directory"))
        except (OSError, UnicodeDecodeError) as exc:
            issues.append(ManifestIssue(file, "", "", "", f"cannot read: {exc}"))


def _parse_text(source: str, text: str, docs: list[Document], issues: list[ManifestIssue]) -> None:
    try:
        raw_docs = (
            _json_documents(text) if source.lower().endswith(".json") else _yaml_documents(text)
        )
    except yaml.MarkedYAMLError as exc:
        issues.append(ManifestIssue(source, "", "", "", _yaml_reason(exc)))
        return
    except yaml.YAMLError as exc:  # pragma: no cover - errors without a position are rare
        issues.append(ManifestIssue(source, "", "", "", f"YAML syntax error: {exc}"))
        return
    except json.JSONDecodeError as exc:
        issues.append(
            ManifestIssue(
                source,
                "",
                "",
                "",
                f"JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            )
        )
        return
    for index, obj in enumerate(raw_docs, start=1):
        if obj is None:
            continue
        _add_object(f"{source}#{index}", obj, docs, issues)


def _add_object(source: str, obj: Any, docs: list[Document], issues: list[ManifestIssue]) -> None:
    if not isinstance(obj, dict):
        issues.append(
            ManifestIssue(source, "", "", "", f"a document must be an object, got {_kind_of(obj)}")
        )
        return
    kind = obj.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and "items" in obj:
        items = obj["items"]
        if items is None:
            return
        if not isinstance(items, list):
            issues.append(ManifestIssue(source, kind, "", "items", "must be a list"))
            return
        for i, item in enumerate(items):
            if item is not None:
                _add_object(f"{source}.items[{i}]", item, docs, issues)
        return
    docs.append(Document(source, obj))


def _yaml_documents(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=_Loader))


def _json_documents(text: str) -> list[Any]:
    """A JSON file may hold several concatenated values, as kubectl accepts."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {json.dumps(key)}")
            out[key] = value
        return out

    decoder = json.JSONDecoder(object_pairs_hook=no_duplicates)
    values: list[Any] = []
    pos = 0
    length = len(text)
    while True:
        while pos < length and text[pos] in " \t\r\n":
            pos += 1
        if pos >= length:
            return values
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError as exc:
            if isinstance(exc, json.JSONDecodeError):
                raise
            raise json.JSONDecodeError(str(exc), text, pos) from None
        values.append(value)


def _yaml_reason(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = exc.problem or "invalid YAML"
    context = f" ({exc.context})" if exc.context else ""
    what = (
        "YAML error" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
    )
    return f"{what}{where}: {problem}{context}"


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__
