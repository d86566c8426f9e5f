"""The local mirror of a node: paths, keys, and `put`/`patch` applied to an immutable tree.

A tree handed out is never mutated afterwards. Each event copies only the containers on
the written path, so unchanged subtrees are shared by identity between successive trees
and a consumer can diff the previous tree against the new one cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from listeners.source.rtdb.errors import ProtocolError

_FORBIDDEN_KEY_CHARS = re.compile(r"[.#$\[\]\x00-\x1f\x7f]")

Json = Any


def split_path(path: str) -> tuple[str, ...]:
    """'/a/b/' -> ('a', 'b'); '' and '/' -> () (the root). Rejects keys the database forbids."""
    keys = tuple(part for part in path.split("/") if part)
    for key in keys:
        if _FORBIDDEN_KEY_CHARS.search(key):
            raise ValueError(f"invalid Realtime Database key {key!r} in path {path!r}")
    return keys


def _event_keys(path: str) -> tuple[str, ...]:
    return tuple(part for part in path.split("/") if part)


def _list_index(node: list[Any], key: str, *, grow: bool) -> int | None:
    """The list position `key` names, if it is a canonical index (one past the end if `grow`)."""
    if not (key.isascii() and key.isdigit()) or (len(key) > 1 and key[0] == "0"):
        return None
    index = int(key)
    limit = len(node) if grow else len(node) - 1
    return index if index <= limit else None


def _child(node: Json, key: str) -> Json:
    if isinstance(node, dict):
        return node.get(key)
    if isinstance(node, list):
        index = _list_index(node, key, grow=False)
        return node[index] if index is not None else None
    return None


def _is_empty(value: Json) -> bool:
    return isinstance(value, dict | list) and not value


class _Editor:
    """Writes into a tree without touching any container that an earlier tree still holds.

    A container on a written path is copied the first time this event writes into it and
    written in place after that, so a patch of many children copies their parent once.
    Lists the server sent stay lists while written at an existing index or appended to;
    any other key turns the list into an object with string keys, as the database stores it.
    """

    def __init__(self, root: Json) -> None:
        self.root = root
        # id -> container copied during this event; holding it keeps the id unique
        self._fresh: dict[int, dict[str, Json] | list[Json]] = {}

    def write(self, keys: Sequence[str], value: Json) -> None:
        self.root = self._write(self.root, keys, 0, value)

    def _write(self, node: Json, keys: Sequence[str], depth: int, value: Json) -> Json:
        if depth == len(keys):
            return None if _is_empty(value) else value
        key = keys[depth]
        child = _child(node, key)
        new_child = self._write(child, keys, depth + 1, value)
        if new_child is child:
            return node
        if new_child is None and not isinstance(node, dict | list):
            return node  # nothing to delete under a leaf
        container = self._own(node, key)
        if isinstance(container, dict):
            if new_child is None:
                container.pop(key, None)
            else:
                container[key] = new_child
        else:
            index = _list_index(container, key, grow=True)
            assert index is not None  # _own turned the list into a dict otherwise
            if index == len(container):
                container.append(new_child)
            else:
                container[index] = new_child
            while container and container[-1] is None:
                container.pop()
        return container if container else None

    def _own(self, node: Json, key: str) -> dict[str, Json] | list[Json]:
        copy: dict[str, Json] | list[Json]
        if isinstance(node, list) and _list_index(node, key, grow=True) is None:
            copy = {str(i): v for i, v in enumerate(node) if v is not None}
        elif id(node) in self._fresh:
            return self._fresh[id(node)]
        elif isinstance(node, dict):
            copy = dict(node)
        elif isinstance(node, list):
            copy = list(node)
        else:
            copy = {}
        self._fresh[id(copy)] = copy
        return copy


def apply_event(tree: Json, kind: str, path: str, data: Json) -> Json:
    """The tree after one `put` (replace at path; null deletes) or `patch` (merge children)."""
    keys = _event_keys(path)
    editor = _Editor(tree)
    if kind == "put":
        editor.write(keys, data)
    elif kind == "patch":
        if not isinstance(data, dict):
            raise ProtocolError(f"patch data is not an object: {type(data).__name__}")
        for child_path, value in data.items():  # a child path may be several keys deep
            editor.write(keys + _event_keys(child_path), value)
    else:
        raise ValueError(f"not a data event: {kind!r}")
    return editor.root
