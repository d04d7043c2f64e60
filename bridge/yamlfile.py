"""The configuration file read once, within bounds, into YAML's node tree (``read_yaml``):
at most MAX_FILE_SIZE bytes of UTF-8, MAX_DEPTH levels and MAX_NODES values, aliases
counted in full. bridge/config.py checks the tree against its schema."""

from __future__ import annotations

import yaml

from .values import ConfigError

# bounds on a configuration file, whoever wrote it: a real one is a few KiB, a few levels
# deep and a few hundred values
MAX_FILE_SIZE = 1 << 20     # bytes
MAX_DEPTH = 32              # mappings and lists inside one another
MAX_NODES = 100_000         # values, keys, mappings and lists; an alias counts in full


class _OutOfBounds(yaml.YAMLError):
    def __init__(self, mark, message: str):
        super().__init__(message)
        self.line, self.message = mark.line + 1, message


class _BoundedComposer(yaml.SafeLoader):
    """YAML's composer within MAX_DEPTH and MAX_NODES. It (and the constructors after it)
    recurses once a level, so a deep file would end in RecursionError; an alias stands
    for all it names, so a small file can name a great many values."""

    def __init__(self, text: str):
        super().__init__(text)
        self.level = 0
        self.sizes: dict[int, tuple[int, int]] = {}   # id(node) → (levels, nodes) in it

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        alias = self.check_event(yaml.AliasEvent)
        self.level += 1
        try:
            if self.level > MAX_DEPTH:
                raise _OutOfBounds(mark, f"nested deeper than {MAX_DEPTH} levels")
            node = super().compose_node(parent, index)
        finally:
            self.level -= 1
        if alias:    # what it names, as deep and as large as where it was written
            depth, size = self.sizes.get(id(node), (1, 1))   # (1, 1): it holds itself
        else:
            inner = node.value if isinstance(node, yaml.SequenceNode) else \
                [n for pair in node.value for n in pair] if isinstance(
                    node, yaml.MappingNode) else ()
            parts = [self.sizes.get(id(n), (1, 1)) for n in inner]
            depth = 1 + max((d for d, _ in parts), default=0)
            size = 1 + sum(n for _, n in parts)
            self.sizes[id(node)] = depth, size
        if self.level + depth > MAX_DEPTH:
            raise _OutOfBounds(mark, f"nested deeper than {MAX_DEPTH} levels "
                               "(aliases counted in full)")
        if size > MAX_NODES:
            raise _OutOfBounds(mark, f"more than {MAX_NODES} values "
                               "(aliases counted in full)")
        return node


def read_yaml(path: str):
    """The YAML node tree of the configuration file PATH (None for an empty file), read
    once, within MAX_FILE_SIZE, MAX_DEPTH and MAX_NODES. Every way it can fail is a
    ConfigError naming the file (and the line where there is one)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_SIZE:
        raise ConfigError(f"{path}: larger than {MAX_FILE_SIZE >> 20} MiB, the most a "
                          "configuration file may be")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text "
                          f"(byte 0x{data[exc.start]:02X})") from None
    try:
        return yaml.compose(text, Loader=_BoundedComposer)
    except _OutOfBounds as exc:
        raise ConfigError(_printable(f"{path}:{exc.line}: {exc.message}")) from None
    except yaml.reader.ReaderError as exc:     # a character YAML does not take anywhere
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(f"{path}:{line}: YAML syntax error: character "
                          f"U+{exc.character:04X} is not allowed in YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        what = getattr(exc, "problem", None) or str(exc)
        if what.startswith("but ") and getattr(exc, "context", None):
            what = f"{exc.context} {what}"     # "expected a single document ... but found"
        raise ConfigError(_printable(f"{where}: YAML syntax error: {what}")) from None


def _printable(text: str) -> str:
    """TEXT on one line: control and other unprintable characters as escapes (\\x00)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)
