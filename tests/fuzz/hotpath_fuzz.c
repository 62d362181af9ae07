/* libFuzzer harness for cext/hotpath.c, built with
 * -fsanitize=fuzzer,address,undefined (see tests/fuzz/run.sh).
 *
 * The first input byte picks the entry point: even -> relay_hp_inspect on the
 * rest as one packet; odd -> relay_hp_scan with (byte 1 % 8) spans read from the
 * next bytes (arbitrary, often out of range) over the remaining bytes. The
 * packet is copied to a buffer of its exact size so AddressSanitizer catches a
 * read or write one byte past it. Beyond "no crash", the harness checks:
 *  - the one's complement sum of the whole packet is unchanged (the stamp and
 *    the checksum patch cancel out; the TCP header sits at an even offset);
 *  - a second pass changes nothing (stamping is idempotent);
 *  - the result is sane (host a lower-case name or [literal], scheme known). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hotpath.h"

static const char TAG[] = "Zq3_x-9A";
#define MAX_SPANS 8

static uint32_t sum_mod_ffff(const uint8_t *p, size_t n)
{
	uint64_t s = 0;
	for (size_t i = 0; i < n; i++)
		s += (i & 1) ? p[i] : (uint32_t)p[i] << 8;
	return (uint32_t)(s % 0xffff);
}

static void check_result(const struct relay_hp_result *r)
{
	if (r->scheme != RELAY_HP_SCHEME_HTTP && r->scheme != RELAY_HP_SCHEME_HTTPS)
		abort();
	if ((r->family != 4 && r->family != 6) || r->host_len > RELAY_HP_HOST_MAX)
		abort();
	for (size_t i = 0; i < r->host_len; i++) {
		char c = r->host[i];
		if (c >= 'A' && c <= 'Z')
			abort();
	}
	if (r->scheme == RELAY_HP_SCHEME_HTTPS && (r->stamped || r->ua_missed))
		abort();
}

static void one_packet(const uint8_t *data, size_t size)
{
	uint8_t *p = malloc(size ? size : 1);
	struct relay_hp_result r;
	memcpy(p, data, size);
	uint32_t before = sum_mod_ffff(p, size);
	int rc = relay_hp_inspect(p, size, TAG, 8, &r);
	if (rc < RELAY_HP_SKIPPED)
		abort();
	if (rc < RELAY_HP_FOUND && memcmp(p, data, size) != 0)
		abort();  /* only HTTP requests are ever modified */
	if (rc >= RELAY_HP_FOUND) {
		check_result(&r);
		if (rc != RELAY_HP_RESULT_FIXED + r.host_len)
			abort();
		if (!r.stamped && memcmp(p, data, size) != 0)
			abort();
		if (sum_mod_ffff(p, size) != before)
			abort();
		uint8_t *again = malloc(size);
		memcpy(again, p, size);
		relay_hp_inspect(again, size, TAG, 8, &r);
		if (memcmp(again, p, size) != 0)
			abort();
		free(again);
	}
	free(p);
}

#define SEEN_SLOTS 4

static void scan(const uint8_t *data, size_t size)
{
	if (size < 2)
		return;
	size_t n = data[1] % MAX_SPANS;
	data += 2;
	size -= 2;
	if (size < n * 8)
		return;
	uint32_t spans[2 * MAX_SPANS];
	memcpy(spans, data, n * 8);
	data += n * 8;
	size -= n * 8;
	uint8_t *buf = malloc(size ? size : 1);
	memcpy(buf, data, size);
	struct relay_hp_totals totals = { 0 };
	for (long i = relay_hp_scan(buf, size, spans, n, 0, TAG, 8, &totals); i < (long)n;
	     i = relay_hp_scan(buf, size, spans, n, (size_t)i + 1, TAG, 8, &totals)) {
		if (i < 0)
			abort();
		check_result(relay_hp_thread_result());
		if (totals.found_len != RELAY_HP_RESULT_FIXED + relay_hp_thread_result()->host_len)
			abort();
	}
	if (totals.skipped > n)
		abort();
	/* The same spans through relay_hp_scan_new with a tiny table (4 slots, so
	 * its load bound is reached): only ever found packets come back. */
	uint64_t seen[SEEN_SLOTS + 1] = { 0 };
	struct relay_hp_totals again = { 0 };
	for (long i = relay_hp_scan_new(buf, size, spans, n, 0, TAG, 8, &again, seen, SEEN_SLOTS);
	     i < (long)n;
	     i = relay_hp_scan_new(buf, size, spans, n, (size_t)i + 1, TAG, 8, &again, seen,
				   SEEN_SLOTS)) {
		if (i < 0)
			abort();
		check_result(relay_hp_thread_result());
	}
	if (seen[SEEN_SLOTS] > SEEN_SLOTS * RELAY_HP_SEEN_LOAD_NUM / RELAY_HP_SEEN_LOAD_DEN)
		abort();
	free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size == 0)
		return 0;
	if (data[0] & 1)
		scan(data, size);
	else
		one_packet(data + 1, size - 1);
	return 0;
}
