/* Hot path of every client->internet packet: User-Agent session stamp and
 * destination (HTTP Host / TLS SNI) extraction, in one bounded pass.
 * The rules are documented in relay/serve/hotpath.py; relay/serve/hotpath_py.py
 * is the pure-Python twin that must give byte-identical results. */
#ifndef RELAY_HOTPATH_H
#define RELAY_HOTPATH_H

#include <stddef.h>
#include <stdint.h>

/* The stamp is the session ID's tag, its first 8 characters: the one C
 * definition, equal to relay.sessionid.TAG_LEN (relay/cext.py refuses a build
 * where they differ). */
#define RELAY_HP_TAG_LEN 8
/* Longest hostname kept: a DNS name is at most 255 octets (RFC 1035 2.3.4). */
#define RELAY_HP_HOST_MAX 255

/* Return codes of relay_hp_inspect. */
#define RELAY_HP_BADTAG (-1)  /* tag is not RELAY_HP_TAG_LEN URL-safe base64 characters */
#define RELAY_HP_SKIPPED 0    /* not a well-formed TCP segment: untouched */
#define RELAY_HP_PLAIN 1      /* TCP, but neither an HTTP request nor a ClientHello */
/* >= RELAY_HP_FOUND: an HTTP request or ClientHello; the value is the number of
 * meaningful leading bytes of the result, RELAY_HP_RESULT_FIXED + host_len, so
 * that Python can use them as a cache key without reading any field. */
#define RELAY_HP_FOUND 2

/* Values of relay_hp_result.scheme. */
#define RELAY_HP_SCHEME_HTTP 1
#define RELAY_HP_SCHEME_HTTPS 2

struct relay_hp_result {
	/* Everything meaningful comes first and contiguous (no padding), the host
	 * last, so that the first RELAY_HP_RESULT_FIXED + host_len bytes say it all. */
	uint32_t stamped;    /* User-Agent values overwritten with the tag */
	uint32_t ua_missed;  /* requests whose User-Agent may lie past the segment end */
	uint16_t dst_port;
	uint16_t host_len;   /* 0: no valid Host / SNI */
	uint8_t scheme;      /* RELAY_HP_SCHEME_* */
	uint8_t family;      /* 4 or 6 */
	uint8_t dst_ip[16];  /* IPv4 in the first 4 bytes, the rest zero */
	char host[RELAY_HP_HOST_MAX];  /* lower-case, not NUL-terminated */
};
#define RELAY_HP_RESULT_FIXED 30  /* offsetof(struct relay_hp_result, host) */

/* Running totals of relay_hp_scan. */
struct relay_hp_totals {
	uint32_t skipped;    /* packets not inspected (malformed, not TCP, bad span) */
	uint32_t stamped;
	uint32_t ua_missed;
	uint32_t found_len;  /* the return value of relay_hp_inspect for the found packet */
};

/* Inspect (and stamp in place) the IP packet pkt[0..len). *out is meaningful
 * only when >= RELAY_HP_FOUND is returned; out == NULL means the calling thread's
 * buffer, relay_hp_thread_result(). Never reads or writes outside
 * pkt[0..len) and tag[0..tag_len). */
int relay_hp_inspect(uint8_t *pkt, size_t len, const char *tag, size_t tag_len,
		     struct relay_hp_result *out);

/* Batch form for a receive buffer holding several packets: packet i is
 * buf[spans[2i] .. spans[2i] + spans[2i+1]); a span outside buf is skipped.
 * Inspects packets start, start+1, ... adding to *totals, and returns the index
 * of the first one found (its result in the thread's buffer, its length in
 * totals->found_len), n
 * when there is none left, or RELAY_HP_BADTAG. One call per found packet
 * instead of one per packet. */
long relay_hp_scan(uint8_t *buf, size_t buf_len, const uint32_t *spans, size_t n, size_t start,
		   const char *tag, size_t tag_len, struct relay_hp_totals *totals);

/* relay_hp_scan for a session that keeps the destinations it has reported in
 * `seen` (seen_slots 64-bit hashes, a power of two, then one count: seen_slots + 1
 * entries zeroed by the caller; open addressing, 0 = empty): a found packet whose destination is already there
 * only adds to *totals and the scan goes on, so Python sees each destination
 * once. Past RELAY_HP_SEEN_LOAD of the slots nothing more is remembered and
 * every found packet is returned, as relay_hp_scan does. */
#define RELAY_HP_SEEN_LOAD_NUM 3
#define RELAY_HP_SEEN_LOAD_DEN 4
long relay_hp_scan_new(uint8_t *buf, size_t buf_len, const uint32_t *spans, size_t n,
		       size_t start, const char *tag, size_t tag_len,
		       struct relay_hp_totals *totals, uint64_t *seen, size_t seen_slots);

/* The calling thread's result buffer, so that Python needs no allocation per
 * packet and no extra call on the fast path (cffi releases the GIL during calls,
 * hence one buffer per thread). */
struct relay_hp_result *relay_hp_thread_result(void);

#endif
