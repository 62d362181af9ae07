#!/usr/bin/env bash
# Entry point for the README's commands. Every verb first runs the idempotent set-up.
#   ./run.sh demo    the relay end to end in network namespaces
#   ./run.sh test    the whole test suite (pytest arguments may follow)
#   ./run.sh bench   the benchmarks (--quick for a short run)
#   ./run.sh setup   only the set-up
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
verb=${1:-}
shift || true
case "$verb" in
  setup) exec "$ROOT/scripts/setup.sh" ;;
  demo)  "$ROOT/scripts/setup.sh" && exec "$ROOT/.venv/bin/relay" demo "$@" ;;
  test)  "$ROOT/scripts/setup.sh" && cd "$ROOT" && exec "$ROOT/.venv/bin/python" -m pytest "$@" ;;
  bench) "$ROOT/scripts/setup.sh" && cd "$ROOT" && exec "$ROOT/.venv/bin/python" -m bench "$@" ;;
  *) echo "usage: $0 demo|test|bench|setup [args]" >&2; exit 2 ;;
esac
