"""A small typed, documented, detectron2-style configuration tree.

Why our own and not yacs/fvcore: we want every key to carry a type and a sentence of
documentation, unknown keys to be reported with close matches, and only safe YAML parsing.
The user-facing behaviour (UPPERCASE namespaces, ``_BASE_`` inheritance, ``KEY VALUE``
overrides) follows detectron2 so that published command lines keep working.
"""

from __future__ import annotations

import ast
import copy
import difflib
import os
from dataclasses import dataclass
from typing import Any

import yaml

BASE_KEY = "_BASE_"


class ConfigError(KeyError):
    """A config key is unknown, has the wrong type, or a config file is malformed."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Key:
    """A declared config key: its default value, its meaning and the accepted types.

    Attributes:
        default: the default value; its type is the key's type unless ``types`` is given.
        doc: one or two sentences saying what the key does.
        types: accepted Python types (``None`` means: the type of ``default``).
    """

    default: Any
    doc: str
    types: tuple[type, ...] | None = None


def _accepted_types(key: Key) -> tuple[type, ...]:
    if key.types is not None:
        return key.types
    if isinstance(key.default, bool):
        return (bool,)
    if isinstance(key.default, float):
        return (float, int)
    if isinstance(key.default, int):
        return (int,)
    if isinstance(key.default, (tuple, list)):
        return (tuple, list)
    if key.default is None:
        return (object,)
    return (type(key.default),)


class CfgNode(dict):
    """A dict with attribute access whose leaves are typed and documented keys.

    Assign a :class:`Key` to declare a leaf (``node.LR = Key(1e-4, "learning rate")``), a
    ``CfgNode`` to declare a namespace. After declaration, assignments are type-checked.
    """

    def __init__(self, init: dict | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_frozen", False)
        object.__setattr__(self, "_keys", {})
        for k, v in (init or {}).items():
            self[k] = v

    # -- attribute access ---------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(self._unknown_message(name)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self.__setitem__(name, value)

    def __setitem__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise AttributeError(f"Config is frozen; cannot set {name!r}. Use cfg.clone() first.")
        if isinstance(value, Key):
            self._keys[name] = value
            value = copy.deepcopy(value.default)
            if isinstance(value, list):
                value = tuple(value)
        elif isinstance(value, dict) and not isinstance(value, CfgNode):
            value = CfgNode(value)
        super().__setitem__(name, value)

    def __deepcopy__(self, memo: dict) -> CfgNode:
        new = CfgNode()
        object.__setattr__(new, "_keys", dict(self._keys))
        for k, v in self.items():
            dict.__setitem__(new, k, copy.deepcopy(v, memo))
        return new

    def _unknown_message(self, name: str, prefix: str = "") -> str:
        full = f"{prefix}{name}"
        candidates = [k for k in self.all_keys()]
        close = difflib.get_close_matches(full, candidates, n=3, cutoff=0.6)
        if not close:  # also try the last component alone, e.g. "BASE_LRR" -> "SOLVER.BASE_LR"
            tails = {k.rsplit(".", 1)[-1]: k for k in candidates}
            close = [
                tails[t] for t in difflib.get_close_matches(name, list(tails), n=3, cutoff=0.7)
            ]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        return f"Unknown config key {full!r}.{hint}"

    # -- introspection ---------------------------------------------------------------------
    def all_keys(self, prefix: str = "") -> list[str]:
        """Every leaf key as a dotted name, e.g. ``SOLVER.BASE_LR``."""
        out = []
        for k, v in self.items():
            if isinstance(v, CfgNode):
                out.extend(v.all_keys(f"{prefix}{k}."))
            else:
                out.append(f"{prefix}{k}")
        return out

    def describe(self, key: str) -> str:
        """The documentation line of a dotted key."""
        node, leaf = self._resolve(key)
        spec = node._keys.get(leaf)
        return spec.doc if spec else ""

    def _resolve(self, key: str) -> tuple[CfgNode, str]:
        parts = key.split(".")
        node: CfgNode = self
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], CfgNode):
                raise ConfigError(self._unknown_message(key))
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(self._unknown_message(key))
        return node, parts[-1]

    # -- merging ---------------------------------------------------------------------------
    def _set_checked(self, key: str, value: Any, source: str, raw: bool = False) -> None:
        """Type-check and set one key; ``raw`` values are command-line text, parsed here."""
        try:
            node, leaf = self._resolve(key)
        except ConfigError as e:
            raise ConfigError(f"{e} (from {source})") from None
        spec = node._keys.get(leaf)
        if raw:
            value = _parse_text(value, spec)
        if isinstance(node[leaf], CfgNode):
            if not isinstance(value, dict):
                raise ConfigError(f"Config key {key!r} is a namespace; got {value!r} ({source}).")
            for k, v in value.items():
                self._set_checked(f"{key}.{k}", v, source)
            return
        if spec is not None:
            value = _coerce(key, value, spec, source)
        dict.__setitem__(node, leaf, value)

    def merge_from_dict(self, values: dict, source: str = "dict") -> None:
        """Merge a nested dict of overrides; unknown keys and wrong types raise ConfigError."""
        if self._frozen:
            raise AttributeError("Config is frozen; use cfg.clone() first.")
        for k, v in values.items():
            if k == BASE_KEY:
                continue
            self._set_checked(k, v, source)

    def merge_from_file(self, path: str | os.PathLike) -> None:
        """Merge a YAML file, following ``_BASE_`` (relative to the file) recursively."""
        self.merge_from_dict(load_yaml_with_base(path), source=str(path))

    def merge_from_list(self, opts: list[str]) -> None:
        """Merge ``["KEY", "VALUE", ...]`` pairs as given on a command line."""
        if len(opts) % 2:
            raise ConfigError(
                f"Overrides must be KEY VALUE pairs; got an odd number of items: {opts}."
            )
        for key, raw in zip(opts[0::2], opts[1::2]):
            if self._frozen:
                raise AttributeError("Config is frozen; use cfg.clone() first.")
            self._set_checked(key, raw, "command line", raw=True)

    # -- misc ------------------------------------------------------------------------------
    def clone(self) -> CfgNode:
        return copy.deepcopy(self)

    def freeze(self) -> CfgNode:
        _set_frozen(self, True)
        return self

    def defrost(self) -> CfgNode:
        _set_frozen(self, False)
        return self

    def is_frozen(self) -> bool:
        return self._frozen

    def to_dict(self) -> dict:
        """A plain nested dict (tuples as lists) suitable for YAML/JSON."""
        return {k: (v.to_dict() if isinstance(v, CfgNode) else _plain(v)) for k, v in self.items()}

    def dump(self) -> str:
        """The resolved config as YAML text that ``merge_from_file`` reads back identically."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


def _set_frozen(node: CfgNode, frozen: bool) -> None:
    object.__setattr__(node, "_frozen", frozen)
    for v in node.values():
        if isinstance(v, CfgNode):
            _set_frozen(v, frozen)


def _parse_text(raw: Any, spec: Key | None) -> Any:
    """Parse command-line text for a key: a string key keeps the text as given (``""`` stays
    empty, ``a: b`` stays text); others take a Python literal, then a YAML scalar, then text."""
    if not isinstance(raw, str):
        return raw
    if spec is not None and _accepted_types(spec) == (str,):
        try:
            parsed = ast.literal_eval(raw)  # a quoted string: '"abc"' -> abc
        except (ValueError, SyntaxError):
            return raw
        # A container for a string key is a mistake worth reporting; numbers stay text.
        return parsed if isinstance(parsed, (str, list, tuple, dict, set)) else raw
    try:
        return ast.literal_eval(raw)  # literals only: never executes code
    except (ValueError, SyntaxError):
        pass
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _coerce(key: str, value: Any, spec: Key, source: str) -> Any:
    types = _accepted_types(spec)
    if object in types:
        return value
    if (tuple in types or list in types) and isinstance(value, str):
        # Published YAML files write tuples as Python text: TRAIN: ("coco_2017_train",).
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = None
        # Otherwise "DATASETS.TRAIN coco_2017_train" means a one-element tuple.
        value = parsed if isinstance(parsed, (tuple, list)) else (value,)
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(_type_message(key, value, types, source))
    if not isinstance(value, types):
        raise ConfigError(_type_message(key, value, types, source))
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, list):
        value = tuple(value)
    return value


def _type_message(key: str, value: Any, types: tuple[type, ...], source: str) -> str:
    names = " or ".join(t.__name__ for t in types)
    return (
        f"Config key {key!r} expects {names}; got {value!r} ({type(value).__name__}) from {source}."
    )


def load_yaml_with_base(path: str | os.PathLike, _seen: tuple[str, ...] = ()) -> dict:
    """Load a YAML config with ``yaml.safe_load``, merging its ``_BASE_`` chain first."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file not found: {path} (expected a YAML config file).")
    if path in _seen:
        raise ConfigError(f"Circular _BASE_ chain: {' -> '.join((*_seen, path))}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file {path} must hold a mapping of keys, got {type(data).__name__}."
        )
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    bases = base if isinstance(base, (list, tuple)) else [base]
    merged: dict = {}
    for b in bases:
        b_path = b if os.path.isabs(b) else os.path.join(os.path.dirname(path), b)
        _deep_update(merged, load_yaml_with_base(b_path, (*_seen, path)))
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
