"""Reading input files safely: every spec, hardware, calibration, suite and
Hugging Face config goes through here.

Conventions (each failure is a SpecError, one line naming the file):
- only a regular file is read (a folder, a device such as /dev/zero, a fifo:
  refused before reading), at most MAX_INPUT_BYTES of it; a name the system
  cannot open (too long, no permission) is named with the system's reason;
- the text is UTF-8 (latin-1, UTF-16, gzip or binary files are refused);
- YAML is parsed with PyYAML's safe loader, bounded: no aliases (`*name`,
  the "billion laughs" expansion), no duplicate keys, at most MAX_DEPTH
  levels of nesting, integers of at most Python's digit limit; `1e12` and
  `19.5e12` are numbers (YAML 1.2), not the strings YAML 1.1 makes them;
- JSON likewise: no duplicate keys, bounded nesting and integer length.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from flopsim.errors import SpecError

MAX_INPUT_BYTES = 16 * 2 ** 20  # a spec is a few kB; a calibration a few hundred
MAX_DEPTH = 64  # a spec nests 3 levels; a calibration 4


def read_input_text(path: Path, what: str) -> str:
    """The UTF-8 text of the regular file `path` (a `what`, for the messages)."""
    try:
        if path.is_dir():
            raise SpecError(f"{path}: is a folder, expected a {what} file")
        if not path.is_file():
            raise SpecError(f"{path}: not a regular file, expected a {what} file")
        with open(path, "rb") as fh:
            data = fh.read(MAX_INPUT_BYTES + 1)
    except OSError as err:
        raise SpecError(f"{str(path)[:120]}: cannot be read ({err.strerror or type(err).__name__})") from None
    if len(data) > MAX_INPUT_BYTES:
        raise SpecError(f"{path}: larger than {MAX_INPUT_BYTES // 2 ** 20} MB, not a {what} file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not UTF-8 text, expected a {what} file (YAML or JSON)") from None


@functools.lru_cache(maxsize=1)
def bounded_loader():
    """yaml.SafeLoader without aliases or duplicate keys, nesting at most MAX_DEPTH (built on
    first use: a command whose files all come from the parsed cache never imports PyYAML)."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not supported",
                                                  event.start_mark)
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                      event.start_mark)
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the base class reports it
                    break
                if duplicate:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {str(key)[:60]!r}",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    # YAML 1.2 floats that PyYAML (YAML 1.1) reads as strings: 1e12, 19.5e12 (no sign, or no dot)
    BoundedLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."))
    return BoundedLoader


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text with BoundedLoader; every failure one line naming `source`. A text
    that parsed before is read back from flopsim.opcache's folder when the cache is on."""
    from flopsim import opcache

    cached = opcache.parsed(text)
    if cached is not None:
        return cached
    import yaml

    try:
        data = yaml.load(text, Loader=bounded_loader())  # noqa: S506 -- a SafeLoader subclass
        opcache.store_parsed(text, data)
        return data
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{source}:{where}: YAML does not parse: {problem}") from None
    except (ValueError, RecursionError) as err:  # an integer past Python's digit limit, say
        raise SpecError(f"{source}: YAML does not parse: {_reason(err)}") from None


def parse_json(text: str, source: str) -> Any:
    """Parse JSON text: no duplicate keys, bounded nesting and integers; one-line failures."""

    def no_duplicates(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise SpecError(f"{source}: JSON has the key {key[:60]!r} twice")
            out[key] = value
        return out

    depth = 0
    for char in text:  # bracket depth, before the recursive parser sees it
        if char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError(f"{source}: JSON nested deeper than {MAX_DEPTH} levels")
        elif char in "]}":
            depth -= 1
    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as err:
        raise SpecError(f"{source}: line {err.lineno}: JSON does not parse: {err.msg}") from None
    except (ValueError, RecursionError) as err:
        raise SpecError(f"{source}: JSON does not parse: {_reason(err)}") from None


def _reason(err: Exception) -> str:
    if isinstance(err, RecursionError):
        return "nested too deeply"
    text = " ".join(str(err).split())
    return "an integer with too many digits" if "digits" in text else text[:120]
