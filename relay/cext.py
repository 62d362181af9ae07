"""Access to the compiled hot path (``relay._cext``), with a clear error when it is
missing, stale, or built with other session-identity lengths than relay.sessionid,
instead of an ImportError deep inside the datapath or records that name no session."""

from relay import sessionid
from relay.errors import RelayError

# Bump together with RELAY_CEXT_ABI in cext/abi.h whenever a C signature changes.
EXPECTED_ABI = 3
_REBUILD = "rebuild with pip install ."

try:
    from relay._cext import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise RelayError(
        f"the C module relay._cext is not built ({exc}); run ./run.sh setup or pip install ."
    ) from exc


def check_build(abi: int, tag_len: int, session_id_lens: set[int]) -> None:
    """Refuse a C module that does not match this Python code: ``abi`` is its ABI
    stamp, ``tag_len`` the tag length it stamps (RELAY_HP_TAG_LEN),
    ``session_id_lens`` the session-ID sizes of its records (RELAY_SESSION_ID_LEN)."""
    if abi != EXPECTED_ABI:
        raise RelayError(f"relay._cext is stale (ABI {abi}, want {EXPECTED_ABI}); {_REBUILD}")
    if tag_len != sessionid.TAG_LEN:
        raise RelayError(
            f"relay._cext stamps {tag_len}-character tags (RELAY_HP_TAG_LEN in "
            f"cext/hotpath.h) but relay.sessionid.TAG_LEN is {sessionid.TAG_LEN}: "
            f"make them equal and {_REBUILD}")
    if session_id_lens != {sessionid.RAW_LEN}:
        raise RelayError(
            f"relay._cext records hold {'/'.join(map(str, sorted(session_id_lens)))}-byte "
            f"session IDs (RELAY_SESSION_ID_LEN in ebpf/record.h) but "
            f"relay.sessionid.RAW_LEN is {sessionid.RAW_LEN}: make them equal and {_REBUILD}")


def _session_id_len(struct: str) -> int:
    return dict(ffi.typeof(struct).fields)["session_id"].type.length


check_build(lib.relay_cext_abi(), lib.RELAY_HP_TAG_LEN,
            {_session_id_len("struct relay_record"), _session_id_len("struct relay_session")})

__all__ = ["check_build", "ffi", "lib"]
