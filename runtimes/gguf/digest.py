"""The sha256 of a GGUF while llama.cpp's quantizer writes it, so the registry need not read it again.

Why: hashing the finished file took 70 ms of a 1.3 s quantization (bench/quantize.py), on one core
while the other idled, and llama.cpp's own quantizer leaves about a third of two cores idle while it
runs. The catch is the order: llama.cpp writes a placeholder header, then the tensor data, and the
real header last, while sha256 must start with the header. So the header is computed up front with
llama.cpp's own gguf code (libggml-base, the same functions its quantizer calls), from the tensor
types a dry run of the same quantization plans, and the data is hashed behind the writer by a
low-priority thread that runs in the cores' idle time.

Nothing here can make a digest wrong: the file's real header is compared with the predicted one
at the end, and any difference, error, missing symbol or a starved thread gives None, which leaves
the hashing to the registry as before.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 20  # bytes hashed per read: small, so a stop request is answered within a millisecond
WRITEBACK_EVERY = 8 << 20  # start the disk's writeback of each 8 MiB hashed, so the final fsync has little left
STALL_S = 0.05  # a follower that makes no progress this long after the writer is done is given up on
GGML_QNT_VERSION = 2  # ggml.h's; llama.cpp writes it as general.quantization_version (checked at the end)
_SPLIT_KEYS = (b"split.no", b"split.count", b"split.tensors.count")  # llama.cpp drops them from its output


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


@functools.cache
def _gguf_api() -> ctypes.CDLL:
    """libggml-base from llama-cpp-python's wheel, with the signatures of the gguf calls used here."""
    import llama_cpp
    from llama_cpp._ctypes_extensions import load_shared_library

    lib = load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
    p, s, i64, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64, ctypes.c_uint32
    for name, restype, argtypes in (
        ("gguf_init_from_file", p, [s, _InitParams]), ("gguf_init_empty", p, []), ("gguf_free", None, [p]),
        ("gguf_set_kv", None, [p, p]), ("gguf_set_val_u32", None, [p, s, u32]), ("gguf_remove_key", i64, [p, s]),
        ("gguf_add_tensor", None, [p, p]), ("gguf_set_tensor_type", None, [p, s, ctypes.c_int]),
        ("gguf_get_meta_size", ctypes.c_size_t, [p]), ("gguf_get_meta_data", None, [p, p]),
        ("ggml_get_tensor", p, [p, s]), ("ggml_free", None, [p]), ("ggml_type_name", s, [ctypes.c_int]),
    ):
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


@functools.cache
def ggml_types() -> dict[str, int]:
    """ggml type name ('q4_K') -> its enum value, as this llama.cpp build names them."""
    import llama_cpp

    api = _gguf_api()
    names = {}
    for value in range(llama_cpp.GGML_TYPE_COUNT):
        name = api.ggml_type_name(value)
        if name:
            names[name.decode()] = value
    return names


def predict_header(source: Path, tensors: list[tuple[str, str]], ftype: int) -> bytes | None:
    """The header llama.cpp's quantizer writes last into its output, made as it makes it: the
    source's key-value pairs with general.quantization_version and general.file_type set (at the
    end) and the split keys removed, then the tensors in its order with their new types.

    `tensors` are (name, ggml type name) as its dry run lists them. None when this build cannot do it.
    """
    try:
        api, types = _gguf_api(), ggml_types()
    except (ImportError, OSError, AttributeError):
        return None
    tensor_ctx = ctypes.c_void_p()
    source_ctx = api.gguf_init_from_file(os.fsencode(source), _InitParams(True, ctypes.pointer(tensor_ctx)))
    if not source_ctx:
        return None
    out = api.gguf_init_empty()
    try:
        api.gguf_set_kv(out, source_ctx)
        api.gguf_set_val_u32(out, b"general.quantization_version", GGML_QNT_VERSION)
        api.gguf_set_val_u32(out, b"general.file_type", ftype)
        for key in _SPLIT_KEYS:
            api.gguf_remove_key(out, key)
        for name, _ in tensors:
            tensor = api.ggml_get_tensor(tensor_ctx, name.encode())
            if not tensor:
                return None
            api.gguf_add_tensor(out, tensor)
        for name, type_name in tensors:
            if type_name not in types:
                return None
            api.gguf_set_tensor_type(out, name.encode(), types[type_name])
        size = api.gguf_get_meta_size(out)
        header = ctypes.create_string_buffer(size)
        api.gguf_get_meta_data(out, header)
        return header.raw
    finally:
        api.gguf_free(out)
        api.gguf_free(source_ctx)
        if tensor_ctx:
            api.ggml_free(tensor_ctx)


class FollowingDigest:
    """sha256 of a file another thread writes front to back, except its first bytes (the header),
    which are written last and given here up front.

    start() runs `plan` (which returns the header, or None to give up) and then follows the file in
    a thread of the lowest CPU priority; finish() after the writer closed the file returns the
    hex digest, or None when it could not be made or the header turned out different.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._done = threading.Event()
        self._abandoned = False
        self._header: bytes | None = None
        self._hash = None
        self._position = 0
        self._failed = False
        self._thread: threading.Thread | None = None

    def start(self, plan: Callable[[], bytes | None]) -> None:
        if self.path.exists():  # a file that is there already may be read before the writer truncates it
            self._failed = True
            return
        self._thread = threading.Thread(target=self._run, args=(plan,), name="gguf-digest", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """Its thread may still be in `plan`, which can call into llama.cpp (and log) after finish() gave up."""
        return self._thread is not None and self._thread.is_alive()

    def abandon(self) -> None:
        self._abandoned = True
        self._done.set()

    def finish(self) -> str | None:
        """Call once the writer is done with the file."""
        self._done.set()
        if self._thread is None:
            return None
        last = -1
        while self._thread.is_alive():
            if self._position == last:  # starved (its low priority on a busy machine): not worth waiting for
                self._abandoned = True
                return None
            last = self._position
            self._thread.join(STALL_S)
        if self._failed or self._abandoned or self._header is None or self._hash is None:
            return None
        try:
            with open(self.path, "rb") as handle:
                written = handle.read(len(self._header))
                size = os.fstat(handle.fileno()).st_size
        except OSError:
            return None
        if written != self._header or size != self._position:
            return None
        return self._hash.hexdigest()

    def _run(self, plan: Callable[[], bytes | None]) -> None:
        lowest_priority()
        try:
            header = plan()
            if header is None or self._abandoned:
                self._failed = True
                return
            self._header, self._hash, self._position = header, hashlib.sha256(header), len(header)
            self._follow()
        except Exception:  # noqa: BLE001 - the registry hashes the file instead
            self._failed = True

    def _follow(self) -> None:
        while True:
            done = self._done.is_set()  # read before trying: a writer done before the open made no file
            try:
                fd = os.open(self.path, os.O_RDONLY)
                break
            except FileNotFoundError:
                if done:
                    self._failed = True
                    return
                self._done.wait(0.005)
        try:
            synced = self._position
            while not self._abandoned:
                done = self._done.is_set()  # read before the size: once done, the size is the final one
                size = os.fstat(fd).st_size
                while self._position < size and not self._abandoned:
                    data = os.pread(fd, min(CHUNK, size - self._position), self._position)
                    if not data:
                        break
                    self._hash.update(data)
                    self._position += len(data)
                    if self._position - synced >= WRITEBACK_EVERY:
                        _start_writeback(fd, synced, self._position - synced)
                        synced = self._position
                if done:
                    return
                self._done.wait(0.005)
        finally:
            os.close(fd)


def lowest_priority() -> None:
    """Nice 19 for this thread only (Linux keeps one per thread): it runs when a core would idle. It
    cannot be raised again, so work of such a thread must have a way out when it starves."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


@functools.cache
def _sync_file_range() -> Callable[..., int]:
    function = ctypes.CDLL(None, use_errno=True).sync_file_range
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): the disk starts writing these pages now, without waiting."""
    if not sys.platform.startswith("linux"):
        return
    try:
        _sync_file_range()(fd, offset, length, 2)
    except (OSError, AttributeError):
        pass
