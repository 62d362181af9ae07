"""cffi (API mode) build of the hot-path C module ``relay._cext``.

Each concern lives in its own pair of files so that they can grow independently:
``cext/NAME.c`` holds the code, ``cext/NAME.h`` its declarations and
``cext/NAME.cdef`` those that Python may call (``record.cdef``, with no ``.c``, is
``ebpf/record.h``'s structs). This script compiles every ``.c`` into one extension
module and exposes every ``.cdef``. Run directly (``python cext/build.py``) to build in place.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = sorted(HERE.glob("*.c"))
CDEFS = sorted(HERE.glob("*.cdef"))

# -O2 and no -ffast-math: the hot path does checksum arithmetic that must be exact.
CFLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration",
          "-fno-strict-aliasing", "-D_GNU_SOURCE"]

ffibuilder = FFI()
ffibuilder.cdef("\n".join(p.read_text() for p in CDEFS))
ffibuilder.set_source(
    "relay._cext",
    "\n".join(f'#include "{p.stem}.h"' for p in SOURCES),
    # setuptools wants source paths relative to the project root, where pip runs this.
    sources=[f"cext/{p.name}" for p in SOURCES],
    include_dirs=[str(HERE), str(HERE.parent / "ebpf")],
    extra_compile_args=CFLAGS,
    # OpenSSL (Debian's libssl-dev): libssl for the DTLS data channel (dtls.c),
    # libcrypto for it and the OpenVPN data channel's AEAD (ovpn.c).
    libraries=["ssl", "crypto"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
