#!/bin/sh
# Fuzz the C hot path (cext/hotpath.c) with libFuzzer under AddressSanitizer and
# UndefinedBehaviorSanitizer.
#
#   tests/fuzz/run.sh [SECONDS] [libFuzzer options...]
#
# SECONDS defaults to 600. Extra options go to libFuzzer, e.g. -fork=4 to use
# four cores. The harness and the corpus it grows live in $FUZZ_DIR (default
# build/fuzz, kept between runs); the seeds in tests/fuzz/corpus are read, never
# written. A crash leaves crash-* in $FUZZ_DIR and a non-zero exit; reproduce it
# with $FUZZ_DIR/hotpath_fuzz $FUZZ_DIR/crash-*. Needs clang with libclang-rt
# (Debian: clang, libclang-rt-14-dev).
set -eu

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SECONDS_=${1:-600}
[ $# -gt 0 ] && shift
FUZZ_DIR=${FUZZ_DIR:-$ROOT/build/fuzz}
CC=${CC:-clang}

command -v "$CC" >/dev/null || { echo "run.sh: $CC not found (apt-get install clang libclang-rt-14-dev)" >&2; exit 1; }
mkdir -p "$FUZZ_DIR/corpus"
"$CC" -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	-Wall -Wextra -Werror -I "$ROOT/cext" \
	"$ROOT/cext/hotpath.c" "$ROOT/tests/fuzz/hotpath_fuzz.c" -o "$FUZZ_DIR/hotpath_fuzz"
cd "$FUZZ_DIR"
exec ./hotpath_fuzz -max_total_time="$SECONDS_" -timeout=5 -rss_limit_mb=2048 \
	-dict="$ROOT/tests/fuzz/hotpath.dict" -artifact_prefix="$FUZZ_DIR/" -print_final_stats=1 \
	"$@" "$FUZZ_DIR/corpus" "$ROOT/tests/fuzz/corpus"
