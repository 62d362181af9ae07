/* libFuzzer harness for cext/blockcodec.c, built with
 * -fsanitize=fuzzer,address,undefined (see tests/fuzz/run.sh).
 *
 * The first input byte picks what the rest is:
 *  - even: an encoded block, as read back from a segment that may be corrupt or
 *    hostile. relay_block_count and relay_block_decode agree or refuse; the
 *    decoder gets exactly the records the count announces (so AddressSanitizer
 *    catches a write past them) and the input in a buffer of its exact size (a
 *    read past it); a block it accepts encodes and decodes back to the same
 *    records, and one record less of room is refused.
 *  - odd: records (struct relay_record, as the drain hands them over: families 4
 *    or 6, address bytes past the family's length zero, GSO fields zero). They
 *    encode into exactly relay_block_bound(n) bytes and decode back the same;
 *    relay_block_time_range is their earliest and latest time. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "blockcodec.h"

/* Room the decoder gets for a block that announces more records: it must refuse
 * it. (A valid block takes at least 7 bytes a record, so a default-size input,
 * -max_len 4096, cannot hold one that large.) */
#define MAX_RECORDS 4096

static void *copy(const void *data, size_t size)
{
	void *p = malloc(size ? size : 1);
	memcpy(p, data, size);
	return p;
}

/* Encode n records, decode them back, compare. */
static void round_trip(const struct relay_record *recs, uint32_t n)
{
	long bound = relay_block_bound(n);
	uint8_t *buf = malloc((size_t)bound);
	long len = relay_block_encode(recs, n, buf, (size_t)bound);
	if (len <= 0 || len > bound)
		abort();
	if (relay_block_encode(recs, n, buf, (size_t)bound - 1) != -1)
		abort(); /* less room than the bound is refused, not overrun */
	uint8_t *block = copy(buf, (size_t)len);
	free(buf);
	if (relay_block_count(block, (size_t)len) != (long)n)
		abort();
	struct relay_record *back = calloc(n ? n : 1, sizeof(*back));
	if (relay_block_decode(block, (size_t)len, back, n) != (long)n)
		abort();
	if (memcmp(back, recs, n * sizeof(*back)) != 0)
		abort();
	if (n && relay_block_decode(block, (size_t)len, back, n - 1) != -1)
		abort();
	free(back);
	free(block);
}

static void decode(const uint8_t *data, size_t size)
{
	uint8_t *block = copy(data, size);
	long n = relay_block_count(block, size);
	if (n < 0 || n > MAX_RECORDS) {
		struct relay_record *out = calloc(MAX_RECORDS, sizeof(*out));
		if (relay_block_decode(block, size, out, MAX_RECORDS) != -1)
			abort();
		free(out);
		free(block);
		return;
	}
	struct relay_record *out = calloc(n ? (size_t)n : 1, sizeof(*out));
	long got = relay_block_decode(block, size, out, (uint32_t)n);
	if (got != -1 && got != n)
		abort();
	if (got == n)
		round_trip(out, (uint32_t)n);
	free(out);
	free(block);
}

static void zero_past(uint8_t *addr, uint8_t family)
{
	if (family != 6)
		memset(addr + 4, 0, 12);
}

static void encode(const uint8_t *data, size_t size)
{
	uint32_t n = (uint32_t)(size / sizeof(struct relay_record));
	struct relay_record *recs = copy(data, n * sizeof(*recs));
	uint64_t lo = n ? UINT64_MAX : 0, hi = 0;
	for (uint32_t i = 0; i < n; i++) {
		struct relay_record *r = &recs[i];
		r->client_family = r->client_family & 1 ? 6 : 4;
		r->family = r->family & 1 ? 6 : 4;
		zero_past(r->client_ip, r->client_family);
		zero_past(r->src_ip, r->family);
		zero_past(r->dst_ip, r->family);
		r->pad[0] = 0;
		r->gso_segs = r->gso_size = 0;
		memset(r->pad2, 0, sizeof(r->pad2));
		lo = r->time_ns < lo ? r->time_ns : lo;
		hi = r->time_ns > hi ? r->time_ns : hi;
	}
	uint64_t range[2];
	relay_block_time_range(recs, n, range);
	if (range[0] != lo || range[1] != hi)
		abort();
	round_trip(recs, n);
	free(recs);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size == 0)
		return 0;
	if (data[0] & 1)
		encode(data + 1, size - 1);
	else
		decode(data + 1, size - 1);
	return 0;
}
