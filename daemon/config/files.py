"""Strict reading of small YAML/JSON files (the config, job files, and for ``data.mapping`` the
mapping files), and which configuration file every command reads.

``read_small_file`` never follows a link, never blocks on a FIFO and refuses a file over
``MAX_COMPANION_BYTES``; ``parse_yaml`` is ``safe_load`` that also refuses a key given twice, nesting
deeper than ``MAX_YAML_DEPTH``, text that is not valid Unicode and, unless the caller allows them (the
config file), YAML aliases: a 50 KB job file of aliases expands to 100 MB. ``find_config_file``: the
first of ``--config FILE``, ``FINE_TUNER_CONFIG``, ``<root>/config.yaml`` and
``/etc/fine-tuner/config.yaml``. Messages name a file by its escaped name and never quote its content.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..text import LONE_SURROGATE_RE, printable


# job file once took a YAML parser 326 s and 6.8 GB). The inbox refuses such drops by the same limit.
MAX_COMPANION_BYTES = 256 * 1024


MAX_YAML_DEPTH = 32  # a config, job or mapping file is two or three levels deep
NOT_UTF8 = "the file is not UTF-8 text (save it as UTF-8)"


class ParseProblem(Exception):
    """A YAML or JSON text that must not be used. ``problem`` says why without quoting the text (a
    key is named, escaped); ``line`` is 1-based, or None."""

    def __init__(self, problem: str, line: int | None = None) -> None:
        self.problem = problem
        self.line = line
        super().__init__(f"{problem} (line {line})" if line is not None else problem)


class FileRefused(OSError):
    """A companion file that is not read: a link, not a regular file, or over the size limit."""


def _line(mark: Any) -> int | None:
    return mark.line + 1 if mark is not None else None


class StrictLoader(yaml.SafeLoader):
    """``safe_load`` that also refuses nesting deeper than ``MAX_YAML_DEPTH`` (PyYAML's composer
    recurses per level: 5,000 ``[`` are a RecursionError), a key given twice in one mapping (PyYAML
    keeps the last one silently) and text that is not valid Unicode (a ``\\ud800`` escape)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise ParseProblem(f"lists or mappings are nested more than {MAX_YAML_DEPTH} levels deep",
                                   _line(self.peek_event().start_mark))
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_scalar(self, node: Any) -> Any:
        value = super().construct_scalar(node)
        if isinstance(value, str) and LONE_SURROGATE_RE.search(value):
            raise ParseProblem(LONE_SURROGATE, _line(node.start_mark))
        return value

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *x' may be overridden on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, Hashable):
                    if key in seen:
                        raise ParseProblem(duplicate_key(key), _line(key_node.start_mark))
                    seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: Any) -> Any:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # over Python's 4,300-digit limit for int()
            raise ParseProblem(TOO_MANY_DIGITS, _line(node.start_mark)) from None

    def construct_yaml_timestamp(self, node: Any) -> Any:
        try:
            return super().construct_yaml_timestamp(node)
        except (ValueError, OverflowError):
            raise ParseProblem(NO_SUCH_DATE, _line(node.start_mark)) from None


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", StrictLoader.construct_yaml_timestamp)


class NoAliasLoader(StrictLoader):
    """``StrictLoader`` that also refuses YAML aliases (``*name``, and so ``<<: *name`` merges): an
    alias repeats a value without repeating its bytes, so a few kilobytes can stand for gigabytes
    once the value is written out (into a system prompt, the metadata, an error). Job and mapping
    files never need one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise ParseProblem(ALIAS_REFUSED, _line(self.peek_event().start_mark))
        return super().compose_node(parent, index)


ALIAS_REFUSED = ("the file uses a YAML alias (*name), which job and mapping files may not use: write each "
                 "value out in full")
LONE_SURROGATE = "a text value holds a lone surrogate escape (\\uD800-\\uDFFF), which is not valid Unicode"
TOO_MANY_DIGITS = "a number has too many digits"
NO_SUCH_DATE = "a date or time that does not exist (such as month 13)"


def duplicate_key(key: Any) -> str:
    shown = f"'{printable(key)}'" if isinstance(key, str) else printable(str(key))
    return f"the key {shown} appears more than once in the same mapping"


def parse_yaml(text: str, *, aliases: bool = False) -> Any:
    """``text`` parsed by ``NoAliasLoader`` (``StrictLoader`` when ``aliases``: only the operator's
    config file): ``ParseProblem`` for what it refuses, ``yaml.YAMLError`` for invalid YAML."""
    loader = StrictLoader if aliases else NoAliasLoader
    return yaml.load(text, Loader=loader)  # noqa: S506 - both loaders are SafeLoaders


def read_small_file(path: str | os.PathLike, limit: int = MAX_COMPANION_BYTES) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them. Opened with ``O_NOFOLLOW``
    and ``O_NONBLOCK`` and checked on the descriptor, so a link is never followed and a FIFO swapped
    in never blocks; the size is checked before anything is read. ``FileRefused`` says why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileRefused(errno.ELOOP, "is a symbolic link; links are not followed "
                                           "(put the file itself there)") from None
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(errno.EINVAL, "is not a regular file (a FIFO, socket or device)")
        if st.st_size > limit:
            raise FileRefused(errno.EFBIG, f"is {st.st_size} bytes, over the limit of {limit} bytes")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:  # it grew after fstat
        raise FileRefused(errno.EFBIG, f"is over the limit of {limit} bytes")
    return data


def _decode(data: bytes) -> str:
    """UTF-8 (a BOM is allowed) or ``ParseProblem``."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ParseProblem(NOT_UTF8) from None


def read_config_file(path: str | os.PathLike) -> dict:
    """Parse the YAML config file (``StrictLoader``: ``safe_load`` without duplicate keys, deep
    nesting or invalid Unicode; the operator's own file may use aliases); errors name the file."""
    p = Path(path)
    source = printable(str(p), limit=4096)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or type(exc).__name__}"], source=source) from None
    parsed = parse_settings(data, source, aliases=True)
    if not isinstance(parsed, dict):
        raise ConfigError(["the top level must be a mapping of sections"], source=source)
    return parsed


def parse_settings(data: bytes, source: str, *, aliases: bool = False) -> Any:
    """``data`` as parsed YAML ({} when empty), or one ConfigError that quotes nothing from it.
    ``aliases``: YAML aliases are allowed (the config file; never a job file)."""
    try:
        parsed = parse_yaml(_decode(data), aliases=aliases)
    except ParseProblem as exc:
        raise ConfigError([str(exc)], source=source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"not valid YAML{where}"], source=source) from None
    return {} if parsed is None else parsed


ROOT_CONFIG = "config.yaml"  # <root>/config.yaml: --root, else the current directory
SYSTEM_CONFIG = "/etc/fine-tuner/config.yaml"  # where systemd/INSTALL.md puts the service's


@dataclass(frozen=True)
class ConfigFile:
    """The configuration file every command reads, and why that one (``find_config_file``)."""

    path: str | None  # None: no file, built-in defaults and FINE_TUNER_* variables only
    found_by: str  # "--config", "FINE_TUNER_CONFIG", "root", "system" or "none"
    looked_at: tuple[str, ...] = ()


def find_config_file(flag: str | None, env: Mapping[str, str], root: str | os.PathLike | None = None, *,
                     system: str | os.PathLike = SYSTEM_CONFIG) -> ConfigFile:
    """The first of: ``--config FILE``, ``$FINE_TUNER_CONFIG``, ``<root>/config.yaml`` (root: ``--root``,
    else the current directory) and ``/etc/fine-tuner/config.yaml``. A file found rather than named
    must be a regular file owned by the caller or root that nobody else may write: a config.yaml
    dropped into a shared folder could send records to another server, so such a file is a
    ConfigError naming it, never silently read or skipped."""
    if flag:
        return ConfigFile(str(flag), "--config")
    if env.get("FINE_TUNER_CONFIG"):
        return ConfigFile(env["FINE_TUNER_CONFIG"], "FINE_TUNER_CONFIG")
    candidates = ((Path(os.path.abspath(Path(root or ".") / ROOT_CONFIG)), "root"), (Path(system), "system"))
    for path, found_by in candidates:
        if os.path.lexists(path):
            if problem := _found_file_problem(path):
                raise ConfigError([problem], source=printable(str(path), limit=4096),
                                  hint="fix the file's owner or mode, or name the file to use with --config "
                                       "or FINE_TUNER_CONFIG")
            return ConfigFile(str(path), found_by)
    return ConfigFile(None, "none", tuple(str(p) for p, _ in candidates))


def _found_file_problem(path: Path) -> str | None:
    """Why a config file found by its place may not be read: not a regular file, owned by someone
    other than the caller or root, or writable by its group or others."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot read the file: {exc.strerror or type(exc).__name__}"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if hasattr(os, "getuid") and st.st_uid not in (0, os.getuid()):
        return f"owned by another user (uid {st.st_uid}): only your own file or root's is read without --config"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "writable by its group or by others: only a file nobody else can change is read without --config"
    return None
