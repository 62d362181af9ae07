"""Access to the compiled hot path (``relay._cext``), with a clear error when it is
missing or stale instead of an ImportError deep inside the datapath."""

from relay.errors import RelayError

# Bump together with RELAY_CEXT_ABI in cext/abi.h whenever a C signature changes.
EXPECTED_ABI = 1

try:
    from relay._cext import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise RelayError(
        f"the C module relay._cext is not built ({exc}); run ./run.sh setup or pip install ."
    ) from exc

if lib.relay_cext_abi() != EXPECTED_ABI:  # pragma: no cover - only on a stale build
    raise RelayError(
        f"relay._cext is stale (ABI {lib.relay_cext_abi()}, want {EXPECTED_ABI}); "
        "rebuild with pip install ."
    )

__all__ = ["ffi", "lib"]
