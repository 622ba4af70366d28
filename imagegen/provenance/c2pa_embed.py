"""C2PA signing by data hash: the manifest is signed for a hash computed here and placed into the file here.

c2pa-python's ``Builder.sign`` has the native library read the image and write the signed copy through Python
callbacks: per 64 px PNG with imagegen's text chunks about 310 reads, 200 seeks and as many writes, each a ctypes
round trip (0.5-0.9 ms of a 0.8 ms signature) that also needs the GIL back. Its C API has the flow made for
callers who handle the bytes themselves (``c2pa_builder_data_hashed_placeholder`` and
``c2pa_builder_sign_data_hashed_embeddable``, which c2pa-python 0.38 loads but does not wrap):

1. the placeholder tells the manifest's size (already wrapped for the format: a PNG ``caBX`` chunk, JPEG APP11
   segments) and gives the builder its ``c2pa.hash.data`` assertion;
2. the manifest goes where c2pa-rs puts it, after the PNG's ``IHDR`` chunk or after a JPEG's SOI and JFIF
   ``APP0``, so the hash of the file with the manifest's bytes excluded is the SHA-256 of the unsigned file;
3. the library signs that hash into a manifest of the placeholder's size, which is spliced in.

The result is what ``Builder.sign`` writes (the same chunk, place and exclusion; the hash assertion is padded
for up to ten exclusions), and validates with any C2PA reader.

Nothing in a signature lets go of the GIL: every native call (the builder's too) goes through a ``ctypes.PyDLL``
handle, the hash is fed to ``hashlib`` in pieces under its 2 KiB release threshold, and the signed file is put
together in a ``BytesIO`` (``bytes.join`` releases the GIL from 1 MiB on). Each release would wait up to the
interpreter's switch interval (5 ms) to get the GIL back whenever another thread of the process is busy (a
replica's other stamp thread, Ray's threads, a render's Python); the calls themselves take 0.05-0.3 ms. Measured
(``bench/stamp_cost.py``, docs/benchmarks.md): a 64 px PNG with imagegen's chunks signs in ~0.4 ms instead of
~0.8, a 1024 px one in 1.5 ms instead of 2.2, and next to a busy thread in the same time (7.5 ms before).
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
JPEG_APP0 = b"\xff\xe0"

#: hashlib hashes pieces under 2048 bytes (its HASHLIB_GIL_MINSIZE) without releasing the GIL
_GIL_HASH_PIECE = 2047
_bytes_out = ctypes.POINTER(ctypes.c_ubyte)
_lock = threading.Lock()
_library: Native | None = None


class ManifestPlacementError(ValueError):
    """The bytes to sign are not a PNG / JPEG this module can place a manifest in."""


def manifest_offset(data: bytes, mime: str) -> int:
    """Where the manifest goes in ``data``: after a PNG's ``IHDR`` chunk, or after a JPEG's SOI and its JFIF
    ``APP0`` segment when it starts with one (where c2pa-rs itself embeds it)."""
    if mime == "image/png":
        if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
            raise ManifestPlacementError("not a PNG that starts with its IHDR chunk")
        return 8 + 12 + struct.unpack(">I", data[8:12])[0]
    if mime == "image/jpeg":
        if data[:2] != JPEG_SOI:
            raise ManifestPlacementError("not a JPEG (no SOI marker)")
        if data[2:4] == JPEG_APP0:
            return 4 + struct.unpack(">H", data[4:6])[0]
        return 2
    raise ManifestPlacementError(f"no manifest placement for {mime}")


def sign_into(
    context: Any, signer: Any, reserve_size: int, definition: dict[str, Any], data: bytes, mime: str
) -> bytes:
    """``data`` with the manifest of ``definition`` signed by ``signer`` embedded (``context``: a ``c2pa.Context``,
    ``signer``: a ``c2pa.Signer`` whose ``reserve_size()`` is ``reserve_size``)."""
    import c2pa

    native = _native()
    at = manifest_offset(data, mime)
    fmt = mime.encode()
    with native.builder(context, json.dumps(definition).encode()) as builder:
        placeholder = native.manifest_bytes(native.placeholder, builder, reserve_size, fmt, what="placeholder")
        data_hash = {
            "exclusions": [{"start": at, "length": len(placeholder)}],
            "name": "jumbf manifest",
            "alg": "sha256",
            # the file with the manifest's bytes excluded is the unsigned file; the library reads the hash as bytes
            "hash": list(_sha256_holding_gil(data)),
            "pad": [],
        }
        manifest = native.manifest_bytes(
            native.sign, builder, signer._handle, json.dumps(data_hash).encode(), fmt, None, what="signature"
        )
    if len(manifest) != len(placeholder):
        raise c2pa.C2paError(f"the signed manifest ({len(manifest)} bytes) is not its placeholder's {len(placeholder)}")
    # one copy, GIL held: bytes.join releases the GIL from 1 MiB on (a switch interval's wait next to a busy thread)
    signed = io.BytesIO()
    view = memoryview(data)
    signed.write(view[:at])
    signed.write(manifest)
    signed.write(view[at:])
    return signed.getvalue()


def _sha256_holding_gil(data: bytes) -> bytes:
    """SHA-256 of ``data`` fed to ``hashlib`` in pieces small enough that it keeps the GIL (it releases it from
    2 KiB on)."""
    digest = hashlib.sha256()
    view = memoryview(data)
    for start in range(0, len(view), _GIL_HASH_PIECE):
        digest.update(view[start : start + _GIL_HASH_PIECE])
    return digest.digest()


class Native:
    """The functions of c2pa-python's native library a signature needs, loaded through ``ctypes.PyDLL`` (called
    with the GIL held). Builders are made here too: c2pa-python's ``Builder`` makes its native calls releasing it."""

    def __init__(self, path: str):
        library = ctypes.PyDLL(path)
        pointer = ctypes.c_void_p
        self.from_context = _function(library.c2pa_builder_from_context, [pointer], pointer)
        self.with_definition = _function(library.c2pa_builder_with_definition, [pointer, ctypes.c_char_p], pointer)
        self.placeholder = _function(
            library.c2pa_builder_data_hashed_placeholder,
            [pointer, ctypes.c_size_t, ctypes.c_char_p, ctypes.POINTER(_bytes_out)],
            ctypes.c_int64,
        )
        self.sign = _function(
            library.c2pa_builder_sign_data_hashed_embeddable,
            [pointer, pointer, ctypes.c_char_p, ctypes.c_char_p, pointer, ctypes.POINTER(_bytes_out)],
            ctypes.c_int64,
        )
        self.free = _function(library.c2pa_free, [pointer], ctypes.c_int)

    def functions(self) -> tuple[Any, ...]:
        return (self.from_context, self.with_definition, self.placeholder, self.sign, self.free)

    @contextmanager
    def builder(self, context: Any, definition: bytes) -> Iterator[int]:
        """A native builder of ``definition`` in ``context``, freed on leaving."""
        builder = _checked(self.from_context(context.execution_context), "C2PA builder failed: {}")
        # consumes the builder it is given, refused definition or not (it keeps it only for a string that is not
        # UTF-8, and json.dumps writes ASCII)
        builder = _checked(self.with_definition(builder, definition), "C2PA manifest definition refused: {}")
        try:
            yield builder
        finally:
            self.free(builder)

    def manifest_bytes(self, function: Any, *args: Any, what: str) -> bytes:
        """Call a native function that returns manifest bytes through its last argument; raise its error."""
        out = _bytes_out()
        length = function(*args, ctypes.byref(out))
        _checked(length >= 0 and bool(out), f"C2PA {what} failed: {{}}")
        try:
            return ctypes.string_at(out, length)
        finally:
            self.free(out)


def _function(function: Any, argtypes: list[Any], restype: Any) -> Any:
    function.argtypes, function.restype = argtypes, restype
    return function


def _checked(result: Any, message: str) -> Any:
    """``result`` when truthy; else the native library's last error raised as c2pa-python raises it."""
    import c2pa.c2pa as binding

    return binding._check_ffi_operation_result(result, message)


def _native() -> Native:
    global _library
    with _lock:
        if _library is None:
            import c2pa.c2pa as binding

            _library = Native(binding._lib._name)
        return _library


def holds_gil() -> bool:
    """Whether every native call of a signature keeps the GIL (the functions are loaded through ``ctypes.PyDLL``)."""
    return all(function._flags_ & ctypes._FUNCFLAG_PYTHONAPI for function in _native().functions())
