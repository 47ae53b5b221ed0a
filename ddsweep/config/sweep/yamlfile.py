"""Reading a sweep file: strict YAML (no duplicate keys, bounded size and depth)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddsweep.config.sweep.study import MAX_SWEEP_BYTES, MAX_YAML_DEPTH
from ddsweep.errors import UserError, first_line


class _YAMLRefused(Exception):
    """A sweep file that PyYAML would read, but not as its author meant (the loader says where)."""


def _strict_loader() -> type:
    """A SafeLoader that refuses duplicate keys (PyYAML keeps the last value silently) and
    nesting deeper than MAX_YAML_DEPTH (PyYAML recurses: a deep file is a RecursionError)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self.depth += 1
            try:
                if self.depth > MAX_YAML_DEPTH:
                    line = self.peek_event().start_mark.line + 1
                    raise _YAMLRefused(
                        f"line {line}: nested deeper than {MAX_YAML_DEPTH} levels; a sweep file "
                        "needs 3"
                    )
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML's own error says so
                    continue
                seen[key] = line
                if first is not None:
                    raise _YAMLRefused(
                        f"line {line}: duplicate key {key!r} (first at line {first}); "
                        "give each key once"
                    )
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def read_yaml(path: Path) -> Any:
    """The YAML document in `path`, read strictly; UserError naming the file (and line)."""
    import yaml

    try:
        size = path.stat().st_size
        if size > MAX_SWEEP_BYTES:
            raise UserError(
                f"{path}: {size:,} bytes is too large for a sweep file (at most "
                f"{MAX_SWEEP_BYTES:,}): is it the right file?"
            )
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file, so not a sweep file") from err
    except OSError as err:
        raise UserError(f"{path}: cannot read it: {first_line(err)}") from err
    try:
        # A SafeLoader subclass: no Python objects are ever built.
        return yaml.load(text, Loader=_strict_loader())
    except _YAMLRefused as err:
        raise UserError(f"{path}: {err}") from err
    except RecursionError as err:  # nesting inside one flow node, before compose_node sees it
        raise UserError(f"{path}: nested too deeply to be a sweep file") from err
    except yaml.MarkedYAMLError as err:
        where = f" at line {err.problem_mark.line + 1}" if err.problem_mark else ""
        raise UserError(f"{path}: not readable YAML: {err.problem}{where}") from err
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not readable YAML: {first_line(err)}") from err
