"""What a GGUF file's header says, read forward with bounded memory and bounded counts.

GGUF (llama.cpp's ``docs/gguf.md``): the magic ``GGUF``, a uint32 version (2 or 3), uint64 tensor
and key/value counts, then each key (a uint64 length and UTF-8 bytes), a uint32 value type and the
value (an array: a uint32 item type, a uint64 count, the items; a string: a uint64 length and its
bytes), then each tensor's name, dimensions, ggml type and data offset, padded to
``general.alignment``, then the tensor data. The ``gguf`` package's reader builds numpy objects for
every array item, which makes a vocabulary of a million empty tokens cost gigabytes in the daemon.
``read_header`` walks the file instead: arrays it does not need are skipped by seeking (a list of
texts by reading only their lengths, a megabyte at a time), the two vocabulary arrays are visited
again only for the few tokens a summary keeps, and every count and length is capped and checked
against the file's size, so a damaged,
cut-off or hostile file is a ``GGUFFormatError`` (it names the file and the offset, never a value),
never an exception of another kind or an exhausted memory.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import GGUFFormatError

STRING, ARRAY = 8, 9
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_INTEGERS = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
VERSIONS = (2, 3)  # what the gguf package reads; version 1 used 32-bit counts
# Caps far above real files (Gemma 3 270M: 262,144 tokens, 33 keys, 236 tensors) and far below harm.
MAX_KEYS = 1 << 16
MAX_ITEMS = 1 << 22  # items in one array
MAX_TENSORS = 1 << 20
MAX_KEY_BYTES = 1 << 16  # a key or a tensor name
MAX_TEXT_BYTES = 1 << 20  # a text value kept (architecture, name, a special token)
MAX_SPECIAL_BYTES = 1 << 24  # all special tokens kept, together
MAX_DEPTH = 4  # arrays of arrays
MAX_DIMS = 4  # GGML_MAX_DIMS
TOKENS, TOKEN_TYPES = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4
_CHUNK = 1 << 20


@dataclass
class Header:
    """The header's figures: ``values`` holds the asked-for keys (an array's first item; a text's
    presence only for ``present`` keys), ``special_tokens`` the control and user-defined tokens
    written ``<...>``."""

    version: int
    tensors: int
    values: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 0
    special_tokens: list[str] = field(default_factory=list)


@dataclass
class _Array:
    item_type: int
    count: int
    offset: int  # of the first item


class _Stream:
    """A forward reader that knows where it is and never reads or seeks past the file's end."""

    def __init__(self, fh: BinaryIO, path: Path, size: int) -> None:
        self.fh, self.path, self.size, self.pos = fh, path, size, 0
        self.order = "<"

    def fail(self, message: str) -> GGUFFormatError:
        return GGUFFormatError(f"the GGUF {self.path.name} {message} (at byte {self.pos})", file=str(self.path),
                               offset=self.pos)

    def read(self, n: int) -> bytes:
        if n > self.size - self.pos:
            raise self.fail("ends before its header does: the file is cut short")
        data = self.fh.read(n)
        if len(data) != n:
            raise self.fail("ends before its header does: the file is cut short")
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        if n > self.size - self.pos:
            raise self.fail("ends before its header does: the file is cut short")
        self.fh.seek(n, os.SEEK_CUR)
        self.pos += n

    def seek(self, offset: int) -> None:
        self.fh.seek(offset)
        self.pos = offset

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(self.order + fmt, self.read(struct.calcsize(fmt)))[0]

    def u32(self) -> int:
        return self.unpack("I")

    def u64(self) -> int:
        return self.unpack("Q")

    def length(self, cap: int, what: str) -> int:
        n = self.u64()
        if n > self.size - self.pos:
            raise self.fail(f"has {what} longer than the rest of the file: the file is cut short or damaged")
        if n > cap:
            raise self.fail(f"has {what} of {n:,} bytes (at most {cap:,} are read)")
        return n

    def text(self, cap: int, what: str) -> str:
        return self.read(self.length(cap, what)).decode("utf-8", "replace")

    def skip_text(self) -> None:
        self.skip(self.length(self.size, "a text"))

    def value_type(self) -> int:
        kind = self.u32()
        if kind not in _SCALARS and kind not in (STRING, ARRAY):
            raise self.fail(f"has a value of unknown type {kind}")
        return kind

    def array_head(self) -> _Array:
        item_type = self.value_type()
        count = self.u64()
        if count > MAX_ITEMS:
            raise self.fail(f"has an array of {count:,} items (at most {MAX_ITEMS:,} are read)")
        return _Array(item_type, count, self.pos)

    def skip_value(self, kind: int, depth: int = 0) -> None:
        if kind == STRING:
            self.skip_text()
        elif kind == ARRAY:
            self.skip_items(self.array_head(), depth + 1)
        else:
            self.skip(struct.calcsize(_SCALARS[kind]))

    def skip_items(self, array: _Array, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise self.fail(f"nests arrays more than {MAX_DEPTH} deep")
        if array.item_type in _SCALARS:
            self.skip(array.count * struct.calcsize(_SCALARS[array.item_type]))
        elif array.item_type == STRING:
            self.texts(array.count)
        else:
            for _ in range(array.count):
                self.skip_value(array.item_type, depth)

    def texts(self, count: int, wanted: bytes | bytearray = b"", keep: Callable[[bytes], None] | None = None) -> None:
        """Walk ``count`` texts in 1 MiB chunks (a million short tokens in a fraction of a second),
        handing ``keep`` the bytes of each text whose flag in ``wanted`` is set (up to
        ``MAX_TEXT_BYTES``); the others are passed over, by seeking when they are long."""
        fh, unpack, size = self.fh, struct.Struct(self.order + "Q").unpack_from, self.size
        buf, i, base = b"", 0, self.pos  # the file is positioned at base + len(buf)

        def fill(need: int) -> None:
            nonlocal buf, i, base
            while len(buf) - i < need:
                chunk = fh.read(max(_CHUNK, need))
                if not chunk:
                    self.pos = base + i
                    raise self.fail("ends before its header does: the file is cut short")
                buf, base, i = buf[i:] + chunk, base + i, 0

        flagged = len(wanted)
        for k in range(count):
            fill(8)
            n = unpack(buf, i)[0]
            i += 8
            if n > size - (base + i):
                self.pos = base + i
                raise self.fail("has a text longer than the rest of the file: the file is cut short or damaged")
            if k < flagged and wanted[k] and n <= MAX_TEXT_BYTES and keep is not None:
                fill(n)
                keep(buf[i:i + n])
            i += n
            if i > len(buf):  # a long text: seek past what is not read yet
                base += i
                fh.seek(base)
                buf, i = b"", 0
        self.pos = base + i
        fh.seek(self.pos)

    def first_value(self, kind: int, present: bool) -> Any:
        """The value (an array's first item, None for an empty one); for ``present`` a text is
        skipped and only whether it is non-empty is kept."""
        if kind == STRING:
            if present:
                n = self.length(self.size, "a text")
                self.skip(n)
                return n > 0
            return self.text(MAX_TEXT_BYTES, "a text")
        if kind != ARRAY:
            return self.unpack(_SCALARS[kind])
        array = self.array_head()
        if array.count == 0 or array.item_type == ARRAY:
            self.skip_items(array, 1)
            return None
        first = self.first_value(array.item_type, present)
        self.skip_items(_Array(array.item_type, array.count - 1, self.pos), 1)
        return first


def read_header(path: str | os.PathLike, keys: frozenset[str] | set[str] = frozenset(),
                present: frozenset[str] | set[str] = frozenset()) -> Header:
    """The header of the GGUF at ``path`` with the values of ``keys`` (and, for ``present``, whether
    the text is non-empty), the vocabulary's size and its special tokens; the tensor table is walked
    and the tensor data must fit in the file. ``GGUFFormatError`` when the file cannot be read so;
    ``OSError`` when it cannot be opened."""
    path = Path(path)
    with open(path, "rb", buffering=1 << 16) as fh:
        s = _Stream(fh, path, os.fstat(fh.fileno()).st_size)
        if s.read(4) != b"GGUF":
            raise s.fail("does not start with GGUF's magic bytes: it is not a GGUF file")
        raw = s.read(4)
        if struct.unpack("<I", raw)[0] & 0xFFFF == 0:  # written on a machine of the other byte order
            s.order = ">"
        version = struct.unpack(s.order + "I", raw)[0]
        if version not in VERSIONS:
            raise s.fail(f"is GGUF version {version}; versions {' and '.join(map(str, VERSIONS))} are read")
        tensor_count, kv_count = s.u64(), s.u64()
        if kv_count > MAX_KEYS or tensor_count > MAX_TENSORS:
            raise s.fail(f"claims {kv_count:,} keys and {tensor_count:,} tensors (at most {MAX_KEYS:,} and "
                         f"{MAX_TENSORS:,} are read)")
        header = Header(version, tensor_count)
        arrays: dict[str, _Array] = {}
        alignment = 32
        seen: set[str] = set()
        for _ in range(kv_count):
            key = s.text(MAX_KEY_BYTES, "a key")
            if key in seen:
                raise s.fail("repeats a key")
            seen.add(key)
            kind = s.value_type()
            if key == "general.alignment":
                if kind != 4:
                    raise s.fail("has a general.alignment that is not a uint32")
                alignment = s.u32()
                if alignment == 0 or alignment & (alignment - 1):
                    raise s.fail("has a general.alignment that is not a power of two")
                header.values[key] = alignment
            elif key in (TOKENS, TOKEN_TYPES):
                if kind != ARRAY:
                    raise s.fail(f"has a {key} that is not an array")
                arrays[key] = s.array_head()
                s.skip_items(arrays[key], 1)
            elif key in keys or key in present:
                header.values[key] = s.first_value(kind, key in present)
            else:
                s.skip_value(kind)
        _walk_tensors(s, tensor_count, alignment)
        tokens = arrays.get(TOKENS)
        if tokens is not None:
            if tokens.item_type != STRING:
                raise s.fail(f"has a {TOKENS} that is not a list of texts")
            header.vocab_size = tokens.count
            header.special_tokens = _special_tokens(s, tokens, _control_flags(s, arrays.get(TOKEN_TYPES)))
    return header


def _walk_tensors(s: _Stream, count: int, alignment: int) -> None:
    """Read the tensor table; the tensor data it describes must lie inside the file."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    end = 0
    for _ in range(count):
        s.skip(s.length(MAX_KEY_BYTES, "a tensor name"))
        n_dims = s.u32()
        if n_dims > MAX_DIMS:
            raise s.fail(f"has a tensor of {n_dims} dimensions (at most {MAX_DIMS})")
        elements = 1
        for _ in range(n_dims):
            elements *= s.u64()
        kind, offset = s.u32(), s.u64()
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise s.fail(f"has a tensor of unknown ggml type {kind}") from None
        end = max(end, offset + elements * size // block)
    data_start = s.pos + (-s.pos % alignment)
    if end and data_start + end > s.size:  # a file without tensor data (a vocabulary) may end unpadded
        raise s.fail(f"holds {s.size:,} bytes but its tensors need {data_start + end:,}: the file is cut short")


def _control_flags(s: _Stream, types: _Array | None) -> bytearray:
    """One byte per token: 1 for a control or user-defined token (``tokenizer.ggml.token_type``)."""
    if types is None or types.count == 0:
        return bytearray()
    if types.item_type not in _INTEGERS:
        raise s.fail(f"has a {TOKEN_TYPES} that is not a list of integers")
    fmt = s.order + _SCALARS[types.item_type]
    width = struct.calcsize(fmt)
    flags = bytearray(types.count)
    s.seek(types.offset)
    done, chunk = 0, 1 << 16
    while done < types.count:
        n = min(chunk, types.count - done)
        for i, (kind,) in enumerate(struct.iter_unpack(fmt, s.read(n * width)), start=done):
            if kind == TOKEN_CONTROL or kind == TOKEN_USER_DEFINED:
                flags[i] = 1
        done += n
    return flags


def _special_tokens(s: _Stream, tokens: _Array, flags: bytearray) -> list[str]:
    """The control and user-defined tokens written ``<...>``, sorted; the others are passed over."""
    special: set[str] = set()
    kept = 0

    def keep(raw: bytes) -> None:
        nonlocal kept
        token = raw.decode("utf-8", "replace")
        if token.startswith("<") and token.endswith(">") and token not in special:
            kept += len(raw)
            if kept > MAX_SPECIAL_BYTES:
                raise s.fail(f"has more than {MAX_SPECIAL_BYTES:,} bytes of special tokens")
            special.add(token)

    s.seek(tokens.offset)
    s.texts(min(tokens.count, len(flags)), flags, keep)
    return sorted(special)
