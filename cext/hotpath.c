/* User-Agent stamp and destination extraction; see hotpath.h and, for the
 * rules, the docstring of relay/hotpath.py. Every byte is attacker controlled:
 * each read is preceded by a bound check against the end of the IP packet
 * (IPv4 total length / IPv6 payload length, never beyond the buffer). */
#include "hotpath.h"

#include <stddef.h>
#include <string.h>

_Static_assert(offsetof(struct relay_hp_result, host) == RELAY_HP_RESULT_FIXED,
	       "the result's fixed part must be contiguous");

/* Header sizes fixed by the protocols. */
#define IPV4_MIN_HDR 20  /* IHL = 5 */
#define IPV6_HDR 40
#define TCP_MIN_HDR 20   /* data offset = 5 */
#define IPPROTO_TCP_ 6
/* IPv6 extension headers we can walk past (RFC 8200 4.1). */
#define IP6_HOPOPTS 0
#define IP6_ROUTING 43
#define IP6_FRAGMENT 44
#define IP6_DSTOPTS 60
#define IP6_FRAG_HDR 8
/* Real packets carry at most a handful of extension headers; a longer chain is
 * either an attack or something we cannot parse anyway. */
#define MAX_IPV6_EXT 8
/* Longest request method we recognise: registered methods are at most 17
 * characters (UPDATEREDIRECTREF); a bound keeps the binary fast path short. */
#define METHOD_MAX 20
/* " HTTP/1.x\r\n" ending a request line. */
#define HTTP_VERSION_TAIL 11
/* Content-Length values of more than 9 digits cannot describe a body within a
 * 64 KiB segment, and 9 digits always fit in 32 bits. */
#define CL_DIGITS_MAX 9
/* Port after a Host name: RFC 3986 allows *DIGIT, ports have at most 5. */
#define PORT_DIGITS_MAX 5
/* TLS: record header (type, version, length), handshake header (type, length),
 * ClientHello version + random. */
#define TLS_RECORD_HDR 5
#define TLS_HANDSHAKE 22
#define TLS_CLIENT_HELLO 1
#define TLS_HS_HDR 4
#define TLS_HELLO_FIXED 34
#define TLS_EXT_SERVER_NAME 0
#define TLS_SNI_HOST_NAME 0

static const char UA_COLON[] = "user-agent:";  /* the partial-line test of the split rule */
#define UA_COLON_LEN 11

struct ctx {
	uint8_t *p;
	size_t tcp;  /* offset of the TCP header: checksum words are aligned on it */
	size_t end;  /* end of the IP packet */
	const char *tag;
	struct relay_hp_result *out;
};

static inline unsigned be16(const uint8_t *p)
{
	return (unsigned)p[0] << 8 | p[1];
}

static inline uint8_t lower(uint8_t c)
{
	return (c >= 'A' && c <= 'Z') ? (uint8_t)(c | 0x20) : c;
}

/* ASCII case-insensitive comparison with a lower-case literal. */
static int ieq(const uint8_t *s, const char *lit, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (lower(s[i]) != (uint8_t)lit[i])
			return 0;
	return 1;
}

static inline int is_ows(uint8_t c)
{
	return c == ' ' || c == '\t';
}

static inline int is_digit(uint8_t c)
{
	return c >= '0' && c <= '9';
}

static inline int is_method_char(uint8_t c)
{
	return (c >= 'A' && c <= 'Z') || c == '-' || c == '_';
}

static inline int is_tag_char(uint8_t c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || is_digit(c) || c == '-' || c == '_';
}

static inline int is_name_char(uint8_t c)
{
	c = lower(c);
	return (c >= 'a' && c <= 'z') || is_digit(c) || c == '-' || c == '.' || c == '_';
}

static inline int is_ip6_literal_char(uint8_t c)
{
	c = lower(c);
	return is_digit(c) || (c >= 'a' && c <= 'f') || c == ':' || c == '.';
}

static uint32_t fold(uint32_t s)
{
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return s;
}

/* One's complement sum of p[a..b) as 16-bit words aligned on the TCP header. */
static uint32_t sum_bytes(const struct ctx *c, size_t a, size_t b)
{
	uint32_t s = 0;
	for (size_t i = a; i < b; i++)
		s += ((i - c->tcp) & 1) ? c->p[i] : (uint32_t)c->p[i] << 8;
	return fold(s);
}

/* Overwrite p[at..at+n) with the tag's first n bytes and patch the TCP checksum
 * incrementally (RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')), so a packet that
 * arrived with a bad checksum keeps exactly the same error. */
static void overwrite(struct ctx *c, size_t at, size_t n)
{
	uint8_t *ck = c->p + c->tcp + 16;
	uint32_t old = sum_bytes(c, at, at + n);

	memcpy(c->p + at, c->tag, n);
	uint32_t acc = (~be16(ck) & 0xffff) + (~old & 0xffff) + sum_bytes(c, at, at + n);
	uint32_t hc = ~fold(acc) & 0xffff;
	ck[0] = (uint8_t)(hc >> 8);
	ck[1] = (uint8_t)hc;
}

/* First CRLF in p[pos..end), or SIZE_MAX. */
static size_t find_crlf(const uint8_t *p, size_t pos, size_t end)
{
	while (pos + 1 < end) {
		const uint8_t *cr = memchr(p + pos, '\r', end - pos - 1);
		if (!cr)
			return SIZE_MAX;
		pos = (size_t)(cr - p);
		if (p[pos + 1] == '\n')
			return pos;
		pos++;
	}
	return SIZE_MAX;
}

/* Length of the request line "METHOD SP target SP HTTP/1.x CRLF" at p[pos..end),
 * CRLF included, or 0 if there is none. */
static size_t request_line(const uint8_t *p, size_t pos, size_t end)
{
	size_t i = pos;

	while (i < end && i - pos < METHOD_MAX && is_method_char(p[i]))
		i++;
	if (i == pos || i >= end || p[i] != ' ')
		return 0;
	size_t target = ++i;
	while (i < end && p[i] >= 0x21 && p[i] <= 0x7e)
		i++;
	if (i == target || end - i < HTTP_VERSION_TAIL || memcmp(p + i, " HTTP/1.", 8) != 0 ||
	    !is_digit(p[i + 8]) || p[i + 9] != '\r' || p[i + 10] != '\n')
		return 0;
	return i + HTTP_VERSION_TAIL - pos;
}

/* Keep s[0..n) as the destination host if it is a plausible DNS name. */
static void set_name(struct relay_hp_result *out, const uint8_t *s, size_t n)
{
	if (n == 0 || n > RELAY_HP_HOST_MAX)
		return;
	for (size_t i = 0; i < n; i++)
		if (!is_name_char(s[i]))
			return;
	for (size_t i = 0; i < n; i++)
		out->host[i] = (char)lower(s[i]);
	out->host_len = (uint16_t)n;
}

/* Host header value v[0..n) (already trimmed): a name or [IPv6 literal], then an
 * optional ":port"; anything else leaves the host empty. */
static void set_http_host(struct relay_hp_result *out, const uint8_t *v, size_t n)
{
	int literal = n && v[0] == '[';
	size_t h = 0;

	if (literal) {
		const uint8_t *rb = memchr(v, ']', n);
		if (!rb)
			return;
		h = (size_t)(rb - v) + 1;
		if (h < 3 || h > RELAY_HP_HOST_MAX)
			return;
		for (size_t i = 1; i + 1 < h; i++)
			if (!is_ip6_literal_char(v[i]))
				return;
	} else {
		while (h < n && v[h] != ':')
			h++;
	}
	if (h < n) {  /* the rest must be ":" *DIGIT */
		if (v[h] != ':' || n - h - 1 > PORT_DIGITS_MAX)
			return;
		for (size_t i = h + 1; i < n; i++)
			if (!is_digit(v[i]))
				return;
	}
	if (literal) {
		for (size_t i = 0; i < h; i++)
			out->host[i] = (char)lower(v[i]);
		out->host_len = (uint16_t)h;
	} else {
		set_name(out, v, h);
	}
}

/* Per-request state of the header walk. */
struct req {
	int first;      /* the first request of the segment: its Host is the destination */
	int host_seen;
	int ua_seen;
	int body_unknown;  /* Transfer-Encoding, or a Content-Length we cannot use */
	size_t body;
};

/* One complete header line p[ls..le) (CRLF excluded). */
static void header(struct ctx *c, struct req *r, size_t ls, size_t le)
{
	uint8_t *p = c->p;
	const uint8_t *colon = memchr(p + ls, ':', le - ls);
	if (!colon)
		return;
	size_t name = (size_t)(colon - p) - ls;
	size_t vs = (size_t)(colon - p) + 1, ve = le;
	while (vs < ve && is_ows(p[vs]))
		vs++;
	while (ve > vs && is_ows(p[ve - 1]))
		ve--;

	if (name == 10 && ieq(p + ls, "user-agent", 10)) {
		size_t n = ve - vs;
		r->ua_seen = 1;
		if (n == 0)
			return;
		if (n > RELAY_HP_TAG_LEN) {
			vs = ve - RELAY_HP_TAG_LEN;
			n = RELAY_HP_TAG_LEN;
		}
		overwrite(c, vs, n);
		c->out->stamped++;
	} else if (name == 4 && ieq(p + ls, "host", 4)) {
		if (r->first && !r->host_seen)
			set_http_host(c->out, p + vs, ve - vs);
		r->host_seen = 1;
	} else if (name == 14 && ieq(p + ls, "content-length", 14)) {
		size_t n = ve - vs, v = 0;
		if (n == 0 || n > CL_DIGITS_MAX) {
			r->body_unknown = 1;
			return;
		}
		for (size_t i = vs; i < ve; i++) {
			if (!is_digit(p[i])) {
				r->body_unknown = 1;
				return;
			}
			v = v * 10 + (p[i] - '0');
		}
		r->body = v;
	} else if (name == 17 && ieq(p + ls, "transfer-encoding", 17)) {
		r->body_unknown = 1;
	}
}

/* The split rule for a header block cut by the segment end at p[pos..end): count
 * a miss if the cut line may be (the start of) a User-Agent header. */
static void cut_block(struct ctx *c, const struct req *r, size_t pos)
{
	size_t n = c->end - pos;

	if (n == 0) {
		if (!r->ua_seen)
			c->out->ua_missed++;
		return;
	}
	if (n > UA_COLON_LEN)
		n = UA_COLON_LEN;
	if (ieq(c->p + pos, UA_COLON, n))
		c->out->ua_missed++;
}

/* Requests of the payload p[pos..end), pos at a request line of length rl. */
static void http(struct ctx *c, size_t pos, size_t rl)
{
	const uint8_t *p = c->p;
	int first = 1;

	for (;;) {
		struct req r = { .first = first };
		pos += rl;
		for (;;) {  /* header lines up to the empty line */
			size_t le = find_crlf(p, pos, c->end);
			if (le == SIZE_MAX) {
				cut_block(c, &r, pos);
				return;
			}
			if (le == pos) {
				pos += 2;
				break;
			}
			header(c, &r, pos, le);
			pos = le + 2;
		}
		/* Another request follows only if this body is delimited and complete. */
		if (r.body_unknown || r.body > c->end - pos)
			return;
		pos += r.body;
		rl = request_line(p, pos, c->end);
		if (!rl)
			return;
		first = 0;
	}
}

/* SNI of a TLS ClientHello starting at p[pos..end). Lengths are clipped to what
 * the segment holds, so a ClientHello spanning segments still yields its SNI
 * when the server_name extension is in this one. */
static void client_hello(struct ctx *c, size_t pos)
{
	const uint8_t *p = c->p;
	size_t rec_end = pos + TLS_RECORD_HDR + be16(p + pos + 3);
	if (rec_end > c->end)
		rec_end = c->end;
	size_t hs = pos + TLS_RECORD_HDR;
	if (hs + TLS_HS_HDR > rec_end)
		return;
	size_t hs_end = hs + TLS_HS_HDR + ((size_t)p[hs + 1] << 16 | be16(p + hs + 2));
	if (hs_end > rec_end)
		hs_end = rec_end;

	size_t i = hs + TLS_HS_HDR + TLS_HELLO_FIXED;
	if (i + 1 > hs_end)
		return;
	i += 1 + p[i];  /* session id */
	if (i + 2 > hs_end)
		return;
	i += 2 + be16(p + i);  /* cipher suites */
	if (i + 1 > hs_end)
		return;
	i += 1 + p[i];  /* compression methods */
	if (i + 2 > hs_end)
		return;
	size_t ext_end = i + 2 + be16(p + i);
	if (ext_end > hs_end)
		ext_end = hs_end;
	i += 2;
	while (i + 4 <= ext_end) {
		unsigned type = be16(p + i);
		size_t n = be16(p + i + 2);
		i += 4;
		if (n > ext_end - i)
			return;
		if (type != TLS_EXT_SERVER_NAME) {
			i += n;
			continue;
		}
		/* ServerNameList: u16 length, then (u8 type, u16 length, name)* */
		if (n < 2)
			return;
		size_t list_end = i + 2 + be16(p + i);
		if (list_end > i + n)
			list_end = i + n;
		for (size_t j = i + 2; j + 3 <= list_end;) {
			size_t name = be16(p + j + 1);
			if (name > list_end - j - 3)
				return;
			if (p[j] == TLS_SNI_HOST_NAME) {
				set_name(c->out, p + j + 3, name);
				return;
			}
			j += 3 + name;
		}
		return;
	}
}

/* The stamp goes into header values: only URL-safe base64 characters, which
 * can never end a header or change its meaning. */
static int tag_ok(const char *tag, size_t tag_len)
{
	if (tag_len != RELAY_HP_TAG_LEN)
		return 0;
	for (size_t i = 0; i < RELAY_HP_TAG_LEN; i++)
		if (!is_tag_char((uint8_t)tag[i]))
			return 0;
	return 1;
}

/* Offset of the TCP header of an IPv6 packet whose payload ends at end, or 0. */
static size_t ipv6_tcp(const uint8_t *p, size_t end)
{
	unsigned next = p[6];
	size_t off = IPV6_HDR;

	for (int k = 0; k <= MAX_IPV6_EXT; k++) {
		switch (next) {
		case IPPROTO_TCP_:
			return off;
		case IP6_HOPOPTS:
		case IP6_ROUTING:
		case IP6_DSTOPTS:
			if (k == MAX_IPV6_EXT || off + 2 > end)
				return 0;
			next = p[off];
			off += ((size_t)p[off + 1] + 1) * 8;
			break;
		case IP6_FRAGMENT:
			/* Only the first fragment holds the TCP header. */
			if (k == MAX_IPV6_EXT || off + IP6_FRAG_HDR > end || (be16(p + off + 2) & 0xfff8))
				return 0;
			next = p[off];
			off += IP6_FRAG_HDR;
			break;
		default:
			return 0;
		}
	}
	return 0;
}

struct relay_hp_result *relay_hp_thread_result(void)
{
	static _Thread_local struct relay_hp_result result;
	return &result;
}

int relay_hp_inspect(uint8_t *p, size_t len, const char *tag, size_t tag_len,
		     struct relay_hp_result *out)
{
	if (!tag_ok(tag, tag_len))
		return RELAY_HP_BADTAG;

	struct ctx c = { .p = p, .tag = tag };
	int family;
	if (len >= IPV4_MIN_HDR && p[0] >> 4 == 4) {
		size_t hl = (size_t)(p[0] & 0x0f) * 4;
		c.end = be16(p + 2);
		/* fragment offset != 0: no TCP header here */
		if (hl < IPV4_MIN_HDR || c.end < hl || c.end > len || p[9] != IPPROTO_TCP_ ||
		    (be16(p + 6) & 0x1fff))
			return RELAY_HP_SKIPPED;
		c.tcp = hl;
		family = 4;
	} else if (len >= IPV6_HDR && p[0] >> 4 == 6) {
		c.end = IPV6_HDR + be16(p + 4);
		if (c.end > len)
			return RELAY_HP_SKIPPED;
		c.tcp = ipv6_tcp(p, c.end);
		if (!c.tcp)
			return RELAY_HP_SKIPPED;
		family = 6;
	} else {
		return RELAY_HP_SKIPPED;
	}
	if (c.tcp + TCP_MIN_HDR > c.end)
		return RELAY_HP_SKIPPED;
	size_t doff = (size_t)(p[c.tcp + 12] >> 4) * 4;
	if (doff < TCP_MIN_HDR || c.tcp + doff > c.end)
		return RELAY_HP_SKIPPED;
	size_t pay = c.tcp + doff;

	/* The fast path: an empty payload, or one that starts like neither a
	 * request method nor a TLS handshake record. */
	size_t rl = 0;
	uint8_t scheme;
	if (pay < c.end && is_method_char(p[pay]) && (rl = request_line(p, pay, c.end)))
		scheme = RELAY_HP_SCHEME_HTTP;
	else if (c.end - pay > TLS_RECORD_HDR && p[pay] == TLS_HANDSHAKE && p[pay + 1] == 3 &&
		 p[pay + TLS_RECORD_HDR] == TLS_CLIENT_HELLO)
		scheme = RELAY_HP_SCHEME_HTTPS;
	else
		return RELAY_HP_PLAIN;

	c.out = out = out ? out : relay_hp_thread_result();
	out->stamped = 0;
	out->ua_missed = 0;
	out->host_len = 0;
	out->scheme = scheme;
	out->family = (uint8_t)family;
	if (family == 4) {
		memcpy(out->dst_ip, p + 16, 4);
		memset(out->dst_ip + 4, 0, 12);
	} else {
		memcpy(out->dst_ip, p + 24, 16);
	}
	out->dst_port = (uint16_t)be16(p + c.tcp + 2);
	if (scheme == RELAY_HP_SCHEME_HTTP)
		http(&c, pay, rl);
	else
		client_hello(&c, pay);
	return RELAY_HP_RESULT_FIXED + out->host_len;
}

long relay_hp_scan(uint8_t *buf, size_t buf_len, const uint32_t *spans, size_t n, size_t start,
		   const char *tag, size_t tag_len, struct relay_hp_totals *totals)
{
	struct relay_hp_result *out = relay_hp_thread_result();

	if (!tag_ok(tag, tag_len))
		return RELAY_HP_BADTAG;
	for (size_t i = start; i < n; i++) {
		size_t off = spans[2 * i], len = spans[2 * i + 1];
		if (off > buf_len || len > buf_len - off) {
			totals->skipped++;
			continue;
		}
		int rc = relay_hp_inspect(buf + off, len, tag, tag_len, out);
		if (rc == RELAY_HP_SKIPPED) {
			totals->skipped++;
		} else if (rc >= RELAY_HP_FOUND) {
			totals->stamped += out->stamped;
			totals->ua_missed += out->ua_missed;
			totals->found_len = (uint32_t)rc;
			return (long)i;
		}
	}
	return (long)n;
}

/* The destination part of a result (port, host length, scheme, family, address,
 * host: everything after the two counts), hashed with FNV-1a; never 0, the
 * empty-slot mark. */
static uint64_t destination_hash(const struct relay_hp_result *r, size_t len)
{
	const uint8_t *p = (const uint8_t *)r + offsetof(struct relay_hp_result, dst_port);
	size_t n = len - offsetof(struct relay_hp_result, dst_port);
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h | 1;
}

/* True when h was in the table; otherwise inserts it while the table is under
 * its load bound. seen[slots] counts the used slots. */
static int seen_before(uint64_t *seen, size_t slots, uint64_t h)
{
	size_t i = (size_t)h & (slots - 1);
	/* The load bound keeps an empty slot on every probe path. */
	while (seen[i] != 0) {
		if (seen[i] == h)
			return 1;
		i = (i + 1) & (slots - 1);
	}
	if (seen[slots] * RELAY_HP_SEEN_LOAD_DEN < slots * RELAY_HP_SEEN_LOAD_NUM) {
		seen[i] = h;
		seen[slots]++;
	}
	return 0;
}

long relay_hp_scan_new(uint8_t *buf, size_t buf_len, const uint32_t *spans, size_t n,
		       size_t start, const char *tag, size_t tag_len,
		       struct relay_hp_totals *totals, uint64_t *seen, size_t seen_slots)
{
	for (;;) {
		long i = relay_hp_scan(buf, buf_len, spans, n, start, tag, tag_len, totals);
		if (i < 0 || (size_t)i >= n)
			return i;
		const struct relay_hp_result *r = relay_hp_thread_result();
		if (seen_slots == 0 || (seen_slots & (seen_slots - 1)) ||
		    !seen_before(seen, seen_slots, destination_hash(r, totals->found_len)))
			return i;
		start = (size_t)i + 1;
	}
}
