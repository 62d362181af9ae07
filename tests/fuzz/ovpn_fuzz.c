/* libFuzzer harness for cext/ovpn.c (the OpenVPN data channel: packets from the
 * network), built with -fsanitize=fuzzer,address,undefined and libcrypto (see
 * tests/fuzz/run.sh).
 *
 * The first input byte picks the entry point (modulo 4):
 *  0: relay_ovpn_open, in place, with (byte 1 % 9) spans read from the next bytes
 *     (arbitrary, often out of range) over the remaining bytes;
 *  1: relay_ovpn_open_stream from offset byte 1 % 16 of the remaining bytes;
 *  2: relay_ovpn_udp_runs, (byte 1 % 9) spans and as many 4-byte addresses, then
 *     the datagrams;
 *  3: relay_ovpn_seal of (byte 1 % 9) payloads, TCP framing if byte 2 is odd, then
 *     the sealed packets opened by the other side, which must give them back.
 * Key id 0 is AES-256-GCM, key id 1 CHACHA20-POLY1305, each with the client keys of
 * tests/fuzz/make_corpus.py, whose seeds are genuine packets: fresh keys for each
 * input, so that they authenticate. The data is copied to a buffer of its exact
 * size so AddressSanitizer catches a read or write one byte past it. Beyond "no
 * crash", the harness checks the counts add up, statuses are known, every
 * reported span lies inside the buffer, and sealing then opening is the identity. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ovpn.h"

#define MAX_SPANS 8
#define MAX_PACKET 4096
#define ADDR 4

static void fill(uint8_t *p, size_t n, uint8_t v)
{
	memset(p, v, n);
}

/* A key whose send key is the byte send repeated and its implicit IV send + 1
 * repeated, and so for receiving (make_corpus.py's ovpn_keys). */
static struct relay_ovpn_key *key(int cipher, uint8_t send, uint8_t recv)
{
	uint8_t ek[RELAY_OVPN_KEY_LEN], eiv[RELAY_OVPN_IMPLICIT_IV_LEN];
	uint8_t dk[RELAY_OVPN_KEY_LEN], div[RELAY_OVPN_IMPLICIT_IV_LEN];
	fill(ek, sizeof(ek), send);
	fill(eiv, sizeof(eiv), (uint8_t)(send + 1));
	fill(dk, sizeof(dk), recv);
	fill(div, sizeof(div), (uint8_t)(recv + 1));
	struct relay_ovpn_key *k = relay_ovpn_key_new(cipher, ek, eiv, dk, div);
	if (!k)
		abort();
	return k;
}

/* The server's keys for key ids 0 and 1: it receives with the client's. */
static void server_keys(struct relay_ovpn_key *keys[RELAY_OVPN_KEY_IDS])
{
	memset(keys, 0, RELAY_OVPN_KEY_IDS * sizeof(keys[0]));
	keys[0] = key(RELAY_OVPN_AES_256_GCM, 0x55, 0x11);
	keys[1] = key(RELAY_OVPN_CHACHA20_POLY1305, 0x77, 0x33);
}

static void free_keys(struct relay_ovpn_key *keys[RELAY_OVPN_KEY_IDS])
{
	for (int i = 0; i < RELAY_OVPN_KEY_IDS; i++)
		relay_ovpn_key_free(keys[i]);
}

static void check(const struct relay_ovpn_opened *r, const uint8_t *status, const uint32_t *plain,
		  const uint32_t *data, size_t n, size_t buf_len)
{
	uint32_t total = 0;
	for (int s = 0; s < RELAY_OVPN_NSTATUS; s++)
		total += r->counts[s];
	if (total != r->n || r->n > n || r->n_data != r->counts[RELAY_OVPN_DATA])
		abort();
	for (size_t i = 0; i < r->n; i++) {
		if (status[i] >= RELAY_OVPN_NSTATUS)
			abort();
		if (status[i] <= RELAY_OVPN_OCC
		    && (plain[2 * i] > buf_len || plain[2 * i + 1] > buf_len - plain[2 * i]))
			abort();
	}
	for (size_t i = 0; i < r->n_data; i++)
		if (data[2 * i] > buf_len || data[2 * i + 1] > buf_len - data[2 * i])
			abort();
}

static size_t read_spans(const uint8_t **p, size_t *len, uint32_t *spans, size_t want)
{
	size_t n = 0;
	while (n < want && *len >= 8) {
		memcpy(&spans[2 * n], *p, 8);
		*p += 8;
		*len -= 8;
		n++;
	}
	return n;
}

static void open_batch(const uint8_t *p, size_t len, size_t want)
{
	uint32_t spans[2 * MAX_SPANS], plain[2 * MAX_SPANS], data[2 * MAX_SPANS];
	uint8_t status[MAX_SPANS];
	size_t n = read_spans(&p, &len, spans, want);
	uint8_t *buf = malloc(len ? len : 1);
	memcpy(buf, p, len);
	struct relay_ovpn_key *keys[RELAY_OVPN_KEY_IDS];
	server_keys(keys);
	struct relay_ovpn_opened r;
	if (relay_ovpn_open(keys, buf, len, spans, n, MAX_PACKET, status, plain, data, &r) < 0)
		abort();
	check(&r, status, plain, data, n, len);
	free_keys(keys);
	free(buf);
}

static void open_stream(const uint8_t *p, size_t len, size_t start)
{
	enum { MAX_N = 64 };
	uint32_t plain[2 * MAX_N], data[2 * MAX_N];
	uint8_t status[MAX_N];
	uint8_t *in = malloc(len ? len : 1), *out = malloc(len ? len : 1);
	memcpy(in, p, len);
	struct relay_ovpn_key *keys[RELAY_OVPN_KEY_IDS];
	server_keys(keys);
	struct relay_ovpn_opened r;
	if (relay_ovpn_open_stream(keys, in, len, start, MAX_PACKET, MAX_N, out, status, plain,
				   data, &r) < 0)
		abort();
	check(&r, status, plain, data, MAX_N, len);
	if (r.end < start || (r.n && r.end > len) || (!r.n && r.end != start))
		abort();
	free_keys(keys);
	free(in);
	free(out);
}

static void runs(const uint8_t *p, size_t len, size_t want)
{
	uint32_t spans[2 * MAX_SPANS], out[3 * MAX_SPANS];
	size_t n = read_spans(&p, &len, spans, want);
	if (len < n * ADDR)
		return;
	uint8_t *addrs = malloc(n * ADDR + 1), *buf = malloc(len - n * ADDR + 1);
	memcpy(addrs, p, n * ADDR);
	memcpy(buf, p + n * ADDR, len - n * ADDR);
	size_t nr = relay_ovpn_udp_runs(buf, len - n * ADDR, spans, n, addrs, ADDR, MAX_PACKET, out);
	size_t covered = 0;
	for (size_t r = 0; r < nr; r++) {  /* the runs tile the datagrams, in order */
		if (out[3 * r] != covered || out[3 * r + 1] == 0 || out[3 * r + 2] > 1)
			abort();
		covered += out[3 * r + 1];
	}
	if (covered != n)
		abort();
	free(addrs);
	free(buf);
}

static void seal_and_open(const uint8_t *p, size_t len, size_t want, int tcp)
{
	uint32_t spans[2 * MAX_SPANS], sealed_spans[2 * MAX_SPANS];
	size_t n = read_spans(&p, &len, spans, want);
	for (size_t i = 0; i < n; i++) {  /* payloads inside the data, at most a packet */
		spans[2 * i] = len ? spans[2 * i] % (uint32_t)len : 0;
		spans[2 * i + 1] %= (uint32_t)(len - spans[2 * i] + 1);
		spans[2 * i + 1] %= MAX_PACKET - RELAY_OVPN_V2_OVERHEAD + 1;
	}
	uint8_t *in = malloc(len ? len : 1);
	memcpy(in, p, len);
	size_t cap = len * n + n * (RELAY_OVPN_V2_OVERHEAD + RELAY_OVPN_TCP_LEN) + 1;
	uint8_t *out = malloc(cap);
	struct relay_ovpn_key *server = key(RELAY_OVPN_CHACHA20_POLY1305, 0x55, 0x11);
	uint64_t bytes = 0;
	long sealed = relay_ovpn_seal(server, 1, 0xabcdef, tcp, in, len, spans, n, out, cap,
				      sealed_spans, &bytes);
	if (sealed != (long)n)
		abort();
	/* The client opens them: it receives with the server's send key. */
	struct relay_ovpn_key *keys[RELAY_OVPN_KEY_IDS] = {0};
	keys[1] = key(RELAY_OVPN_CHACHA20_POLY1305, 0x11, 0x55);
	uint32_t plain[2 * MAX_SPANS], data[2 * MAX_SPANS];
	uint8_t status[MAX_SPANS];
	for (size_t i = 0; i < n; i++) {  /* without the TCP length */
		sealed_spans[2 * i] += tcp ? RELAY_OVPN_TCP_LEN : 0;
		sealed_spans[2 * i + 1] -= tcp ? RELAY_OVPN_TCP_LEN : 0;
	}
	struct relay_ovpn_opened r;
	if (relay_ovpn_open(keys, out, cap, sealed_spans, n, MAX_PACKET, status, plain, data, &r)
	    < 0)
		abort();
	if (r.counts[RELAY_OVPN_DATA] + r.counts[RELAY_OVPN_PING] + r.counts[RELAY_OVPN_OCC] != n)
		abort();
	uint64_t total = 0;
	for (size_t i = 0; i < n; i++) {
		if (plain[2 * i + 1] != spans[2 * i + 1]
		    || memcmp(out + plain[2 * i], in + spans[2 * i], spans[2 * i + 1]))
			abort();
		total += spans[2 * i + 1];
	}
	if (total != bytes)
		abort();
	relay_ovpn_key_free(server);
	free_keys(keys);
	free(in);
	free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 3)
		return 0;
	size_t want = data[1] % (MAX_SPANS + 1);
	switch (data[0] % 4) {
	case 0:
		open_batch(data + 2, size - 2, want);
		break;
	case 1:
		open_stream(data + 2, size - 2, data[1] % 16);
		break;
	case 2:
		runs(data + 2, size - 2, want);
		break;
	default:
		seal_and_open(data + 3, size - 3, want, data[2] & 1);
	}
	return 0;
}
