#!/bin/sh
# Fuzz the C parsers with libFuzzer under AddressSanitizer and
# UndefinedBehaviorSanitizer: the hot path (cext/hotpath.c, packets from the
# network), the packet-log block codec (cext/blockcodec.c, blocks read back
# from segments that may be corrupt) or the OpenVPN data channel (cext/ovpn.c,
# packets from the network).
#
#   tests/fuzz/run.sh [hotpath|blockcodec|ovpn] [SECONDS] [libFuzzer options...]
#
# The target defaults to hotpath, SECONDS to 600. Extra options go to libFuzzer,
# e.g. -fork=4 to use four cores. The harness and the corpus it grows live in
# $FUZZ_DIR (default build/fuzz, kept between runs); the seeds in
# tests/fuzz/corpus/TARGET are read, never written. A crash leaves crash-* in
# $FUZZ_DIR and a non-zero exit; reproduce it with $FUZZ_DIR/TARGET_fuzz
# $FUZZ_DIR/crash-*. Needs clang with libclang-rt (Debian: clang,
# libclang-rt-14-dev), and for ovpn OpenSSL's libcrypto (libssl-dev).
set -eu

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=hotpath
case "${1:-}" in
	hotpath|blockcodec|ovpn) TARGET=$1; shift ;;
esac
SECONDS_=${1:-600}
[ $# -gt 0 ] && shift
FUZZ_DIR=${FUZZ_DIR:-$ROOT/build/fuzz}
CC=${CC:-clang}

command -v "$CC" >/dev/null || { echo "run.sh: $CC not found (apt-get install clang libclang-rt-14-dev)" >&2; exit 1; }
mkdir -p "$FUZZ_DIR/corpus/$TARGET"
LIBS=
if [ "$TARGET" = ovpn ]; then LIBS=-lcrypto; fi  # the data channel's AEAD
"$CC" -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	-Wall -Wextra -Werror -I "$ROOT/cext" -I "$ROOT/ebpf" \
	"$ROOT/cext/$TARGET.c" "$ROOT/tests/fuzz/${TARGET}_fuzz.c" -o "$FUZZ_DIR/${TARGET}_fuzz" $LIBS
DICT_OPT=
[ -f "$ROOT/tests/fuzz/$TARGET.dict" ] && DICT_OPT=-dict="$ROOT/tests/fuzz/$TARGET.dict"
cd "$FUZZ_DIR"
exec "./${TARGET}_fuzz" -max_total_time="$SECONDS_" -timeout=5 -rss_limit_mb=2048 \
	$DICT_OPT -artifact_prefix="$FUZZ_DIR/" -print_final_stats=1 \
	"$@" "$FUZZ_DIR/corpus/$TARGET" "$ROOT/tests/fuzz/corpus/$TARGET"
