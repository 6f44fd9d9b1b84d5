"""Which files of a folder any process opens (Linux inotify through ctypes): the bad-export
table and the folder fuzz watch a folder outside the export, which no runtime may open."""
from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

IN_OPEN, IN_NONBLOCK = 0x20, 0o4000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the name)


class OpenWatch:
    """`with OpenWatch(folder) as w: ...; w.opened()` -> names opened in `folder` since entry."""

    def __init__(self, folder: Path):
        self.folder, self.names = Path(folder), []
        self.libc = ctypes.CDLL(None, use_errno=True)

    def __enter__(self) -> "OpenWatch":
        self.fd = self.libc.inotify_init1(IN_NONBLOCK)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, str(self.folder).encode(),
                                                      IN_OPEN) < 0:
            raise OSError(ctypes.get_errno(), "inotify unavailable")
        return self

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            i = 0
            while i < len(data):
                _, mask, _, n = _EVENT.unpack_from(data, i)
                name = data[i + _EVENT.size:i + _EVENT.size + n].rstrip(b"\0").decode()
                self.names.append(name or ".")
                i += _EVENT.size + n

    def opened(self) -> list[str]:
        if self.fd >= 0:
            self._drain()
        return list(self.names)

    def __exit__(self, *exc) -> None:
        self._drain()
        os.close(self.fd)
        self.fd = -1
