/* The block codec: a block of records <-> the columnar byte layout described in
 * relay/packetlog/segments.py (the Python side only compresses it with zstd and
 * writes). relay/packetlog/blockcodec_py.py is the decoder's Python twin; the
 * decoder reads files that may be corrupt or hostile, so every count and index is
 * checked against the input (tests/fuzz/blockcodec_fuzz.c). */
#include "blockcodec.h"

#include <stdlib.h>
#include <string.h>

#define EMPTY UINT32_MAX
/* Worst case bytes of one encoded record: ts 10 + flow 5 + flags 1 + len 3 +
 * window 3 + seq 5 + ack 5, and its own session (36), two addresses (2 x 17)
 * and flow entry (5 + 2 + 10 + 4) if every record is distinct. */
#define RECORD_BOUND 128
#define BLOCK_HEADER_BOUND 64

static uint64_t fnv(const void *p, size_t n, uint64_t h)
{
	const uint8_t *b = p;
	for (size_t i = 0; i < n; i++)
		h = (h ^ b[i]) * 0x100000001b3ULL;
	return h;
}
#define FNV0 0xcbf29ce484222325ULL

struct addr_key { uint8_t fam; uint8_t a[16]; };
struct flow_key { uint32_t sess, src, dst; uint16_t sport, dport; uint8_t dir, fam, pad[2]; };

struct table {
	uint32_t *slots;
	uint32_t mask;
};

static int table_init(struct table *t, uint32_t n)
{
	uint32_t cap = 16;
	while (cap < 2 * n)
		cap <<= 1;
	t->mask = cap - 1;
	t->slots = malloc(sizeof(uint32_t) * cap);
	if (!t->slots)
		return -1;
	memset(t->slots, 0xff, sizeof(uint32_t) * cap);
	return 0;
}

static uint8_t *put_varint(uint8_t *p, uint64_t v)
{
	while (v >= 0x80) {
		*p++ = (uint8_t)(v | 0x80);
		v >>= 7;
	}
	*p++ = (uint8_t)v;
	return p;
}
static uint64_t zz64(int64_t v) { return ((uint64_t)v << 1) ^ (uint64_t)(v >> 63); }
static uint32_t zz32(int32_t v) { return ((uint32_t)v << 1) ^ (uint32_t)(v >> 31); }
static int64_t unzz64(uint64_t v) { return (int64_t)(v >> 1) ^ -(int64_t)(v & 1); }
static int32_t unzz32(uint32_t v) { return (int32_t)(v >> 1) ^ -(int32_t)(v & 1); }
static uint8_t *put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); return p + 2; }
static int addr_len(uint8_t fam) { return fam == RELAY_FAMILY_V6 ? 16 : 4; }

long relay_block_bound(uint32_t n)
{
	return BLOCK_HEADER_BOUND + (long)n * RECORD_BOUND;
}

/* Session identity of a record: all fields that the session map supplied. */
static int same_session(const struct relay_record *a, const struct relay_record *b)
{
	return !memcmp(a->session_id, b->session_id, RELAY_SESSION_ID_LEN)
		&& !memcmp(a->client_ip, b->client_ip, 16)
		&& a->client_port == b->client_port && a->client_family == b->client_family
		&& a->rflags == b->rflags;
}

static uint64_t session_hash(const struct relay_record *r)
{
	uint64_t h = fnv(r->session_id, RELAY_SESSION_ID_LEN, FNV0);
	h = fnv(r->client_ip, 16, h);
	return fnv(&r->client_port, 2, h) ^ r->client_family ^ ((uint64_t)r->rflags << 8);
}

long relay_block_encode(const struct relay_record *recs, uint32_t n, uint8_t *out, size_t cap)
{
	if (cap < (size_t)relay_block_bound(n))
		return -1;
	long ret = -1;
	uint32_t *rec_flow = malloc(sizeof(uint32_t) * (n ? n : 1));
	uint32_t *sess_rep = malloc(sizeof(uint32_t) * (n ? n : 1));
	struct addr_key *addrs = malloc(sizeof(struct addr_key) * 2 * (n ? n : 1));
	struct flow_key *flows = malloc(sizeof(struct flow_key) * (n ? n : 1));
	uint32_t *prev = malloc(sizeof(uint32_t) * (n ? n : 1));
	struct table ts = {0}, ta = {0}, tf = {0};
	uint32_t nsess = 0, naddr = 0, nflow = 0;
	if (!rec_flow || !sess_rep || !addrs || !flows || !prev || table_init(&ts, n)
	    || table_init(&ta, 2 * n) || table_init(&tf, n))
		goto out;

	for (uint32_t i = 0; i < n; i++) {
		const struct relay_record *r = &recs[i];
		uint32_t s = (uint32_t)session_hash(r) & ts.mask;
		while (ts.slots[s] != EMPTY && !same_session(&recs[sess_rep[ts.slots[s]]], r))
			s = (s + 1) & ts.mask;
		if (ts.slots[s] == EMPTY) {
			ts.slots[s] = nsess;
			sess_rep[nsess++] = i;
		}
		struct flow_key fk;
		memset(&fk, 0, sizeof(fk));
		fk.sess = ts.slots[s];
		for (int k = 0; k < 2; k++) {
			struct addr_key ak;
			memset(&ak, 0, sizeof(ak));
			ak.fam = r->family;
			memcpy(ak.a, k ? r->dst_ip : r->src_ip, 16);
			uint32_t a = (uint32_t)fnv(&ak, sizeof(ak), FNV0) & ta.mask;
			while (ta.slots[a] != EMPTY && memcmp(&addrs[ta.slots[a]], &ak, sizeof(ak)))
				a = (a + 1) & ta.mask;
			if (ta.slots[a] == EMPTY) {
				ta.slots[a] = naddr;
				addrs[naddr++] = ak;
			}
			if (k)
				fk.dst = ta.slots[a];
			else
				fk.src = ta.slots[a];
		}
		fk.sport = r->src_port;
		fk.dport = r->dst_port;
		fk.dir = r->direction;
		fk.fam = r->family;
		uint32_t f = (uint32_t)fnv(&fk, sizeof(fk), FNV0) & tf.mask;
		while (tf.slots[f] != EMPTY && memcmp(&flows[tf.slots[f]], &fk, sizeof(fk)))
			f = (f + 1) & tf.mask;
		if (tf.slots[f] == EMPTY) {
			tf.slots[f] = nflow;
			flows[nflow++] = fk;
		}
		rec_flow[i] = tf.slots[f];
	}

	uint8_t *p = out;
	*p++ = 1; /* layout version */
	p = put_varint(p, n);
	p = put_varint(p, nsess);
	for (uint32_t k = 0; k < nsess; k++) {
		const struct relay_record *r = &recs[sess_rep[k]];
		memcpy(p, r->session_id, RELAY_SESSION_ID_LEN);
		p += RELAY_SESSION_ID_LEN;
		*p++ = r->rflags;
		*p++ = r->client_family;
		int al = addr_len(r->client_family);
		memcpy(p, r->client_ip, (size_t)al);
		p += al;
		p = put16(p, r->client_port);
	}
	p = put_varint(p, naddr);
	for (uint32_t k = 0; k < naddr; k++) {
		*p++ = addrs[k].fam;
		int al = addr_len(addrs[k].fam);
		memcpy(p, addrs[k].a, (size_t)al);
		p += al;
	}
	p = put_varint(p, nflow);
	for (uint32_t k = 0; k < nflow; k++) {
		p = put_varint(p, flows[k].sess);
		*p++ = flows[k].dir;
		p = put_varint(p, flows[k].src);
		p = put_varint(p, flows[k].dst);
		p = put16(p, flows[k].sport);
		p = put16(p, flows[k].dport);
	}
	uint64_t last = n ? recs[0].time_ns : 0;
	for (int b = 0; b < 8; b++)
		*p++ = (uint8_t)(last >> (8 * b));
	for (uint32_t i = 0; i < n; i++) {
		p = put_varint(p, zz64((int64_t)(recs[i].time_ns - last)));
		last = recs[i].time_ns;
	}
	for (uint32_t i = 0; i < n; i++)
		p = put_varint(p, rec_flow[i]);
	for (uint32_t i = 0; i < n; i++)
		*p++ = recs[i].tcp_flags;
	for (uint32_t i = 0; i < n; i++)
		p = put_varint(p, recs[i].payload_len);
	/* Per-flow deltas: within a flow, window, seq and ack move by small steps. */
	memset(prev, 0, sizeof(uint32_t) * nflow);
	for (uint32_t i = 0; i < n; i++) {
		p = put_varint(p, zz32((int32_t)(recs[i].window - prev[rec_flow[i]])));
		prev[rec_flow[i]] = recs[i].window;
	}
	memset(prev, 0, sizeof(uint32_t) * nflow);
	for (uint32_t i = 0; i < n; i++) {
		p = put_varint(p, zz32((int32_t)(recs[i].seq - prev[rec_flow[i]])));
		prev[rec_flow[i]] = recs[i].seq;
	}
	memset(prev, 0, sizeof(uint32_t) * nflow);
	for (uint32_t i = 0; i < n; i++) {
		p = put_varint(p, zz32((int32_t)(recs[i].ack - prev[rec_flow[i]])));
		prev[rec_flow[i]] = recs[i].ack;
	}
	ret = p - out;
out:
	free(rec_flow);
	free(sess_rep);
	free(addrs);
	free(flows);
	free(prev);
	free(ts.slots);
	free(ta.slots);
	free(tf.slots);
	return ret;
}

struct reader {
	const uint8_t *p, *end;
	int bad;
};

/* Always inlined, as get_uint: the decoder reads seven varints a record, and a call
 * for each costs a sixth of its speed (about 24 instead of 20 ns a record here). */
#define READER_INLINE static inline __attribute__((always_inline))

READER_INLINE uint64_t get_varint(struct reader *r)
{
	uint64_t v = 0;
	for (int shift = 0; shift < 63; shift += 7) {
		if (r->p >= r->end) {
			r->bad = 1;
			return 0;
		}
		uint8_t b = *r->p++;
		v |= (uint64_t)(b & 0x7f) << shift;
		if (!(b & 0x80))
			return v;
	}
	/* A tenth byte holds bit 63 alone: anything more is past 64 bits. */
	if (r->p >= r->end || *r->p > 1) {
		r->bad = 1;
		return 0;
	}
	return v | (uint64_t)*r->p++ << 63;
}

/* A varint of a field no wider than max: the encoder writes no more, so a wider
 * one is a corrupt block, never a value to cut down (blockcodec_py.py agrees). */
READER_INLINE uint64_t get_uint(struct reader *r, uint64_t max)
{
	uint64_t v = get_varint(r);
	if (v > max)
		r->bad = 1;
	return v;
}

static const uint8_t *get_bytes(struct reader *r, size_t n)
{
	if ((size_t)(r->end - r->p) < n) {
		r->bad = 1;
		return NULL;
	}
	const uint8_t *q = r->p;
	r->p += n;
	return q;
}

static int get_addr(struct reader *r, uint8_t fam, uint8_t *dst)
{
	if (fam != RELAY_FAMILY_V4 && fam != RELAY_FAMILY_V6 && fam != 0)
		return -1;
	const uint8_t *a = get_bytes(r, (size_t)addr_len(fam));
	if (!a)
		return -1;
	memset(dst, 0, 16);
	memcpy(dst, a, (size_t)addr_len(fam));
	return 0;
}

/* Number of records in an encoded block, or -1 when its header is malformed. */
long relay_block_count(const uint8_t *in, size_t len)
{
	struct reader r = {in, in + len, 0};
	const uint8_t *v = get_bytes(&r, 1);
	if (!v || *v != 1)
		return -1;
	uint64_t n = get_varint(&r);
	return r.bad || n > UINT32_MAX ? -1 : (long)n;
}

long relay_block_decode(const uint8_t *in, size_t len, struct relay_record *out, uint32_t cap)
{
	struct reader r = {in, in + len, 0};
	long ret = -1;
	struct relay_record *sess = NULL;
	struct addr_key *addrs = NULL;
	struct flow_key *flows = NULL;
	uint32_t *prev = NULL, *fl = NULL;
	const uint8_t *v = get_bytes(&r, 1);
	if (!v || *v != 1)
		return -1;
	uint64_t n = get_varint(&r);
	if (r.bad || n > cap)
		return -1;
	uint64_t nsess = get_varint(&r);
	/* Each table entry takes at least 7 bytes, so a count past the input is corrupt. */
	if (r.bad || nsess > len)
		return -1;
	sess = calloc(nsess ? nsess : 1, sizeof(*sess));
	if (!sess)
		goto out;
	for (uint64_t k = 0; k < nsess; k++) {
		/* session ID, record flags, client family */
		const uint8_t *b = get_bytes(&r, RELAY_SESSION_ID_LEN + 2);
		if (!b)
			goto out;
		memcpy(sess[k].session_id, b, RELAY_SESSION_ID_LEN);
		sess[k].rflags = b[RELAY_SESSION_ID_LEN];
		sess[k].client_family = b[RELAY_SESSION_ID_LEN + 1];
		if (get_addr(&r, sess[k].client_family, sess[k].client_ip) < 0)
			goto out;
		const uint8_t *pt = get_bytes(&r, 2);
		if (!pt)
			goto out;
		sess[k].client_port = (uint16_t)(pt[0] | pt[1] << 8);
	}
	uint64_t naddr = get_varint(&r);
	if (r.bad || naddr > len)
		goto out;
	addrs = calloc(naddr ? naddr : 1, sizeof(*addrs));
	if (!addrs)
		goto out;
	for (uint64_t k = 0; k < naddr; k++) {
		const uint8_t *f = get_bytes(&r, 1);
		if (!f || get_addr(&r, *f, addrs[k].a) < 0)
			goto out;
		addrs[k].fam = *f;
	}
	uint64_t nflow = get_varint(&r);
	if (r.bad || nflow > len)
		goto out;
	flows = calloc(nflow ? nflow : 1, sizeof(*flows));
	prev = calloc(nflow ? nflow : 1, sizeof(*prev));
	fl = calloc(n ? n : 1, sizeof(*fl));
	if (!flows || !prev || !fl)
		goto out;
	for (uint64_t k = 0; k < nflow; k++) {
		flows[k].sess = (uint32_t)get_uint(&r, UINT32_MAX);
		const uint8_t *d = get_bytes(&r, 1);
		flows[k].src = (uint32_t)get_uint(&r, UINT32_MAX);
		flows[k].dst = (uint32_t)get_uint(&r, UINT32_MAX);
		const uint8_t *pt = get_bytes(&r, 4);
		if (r.bad || flows[k].sess >= nsess || flows[k].src >= naddr || flows[k].dst >= naddr)
			goto out;
		flows[k].dir = *d;
		flows[k].sport = (uint16_t)(pt[0] | pt[1] << 8);
		flows[k].dport = (uint16_t)(pt[2] | pt[3] << 8);
	}
	const uint8_t *tb = get_bytes(&r, 8);
	if (!tb)
		goto out;
	uint64_t t = 0;
	for (int b = 0; b < 8; b++)
		t |= (uint64_t)tb[b] << (8 * b);
	for (uint64_t i = 0; i < n; i++) {
		t += (uint64_t)unzz64(get_varint(&r));
		out[i].time_ns = t;
	}
	for (uint64_t i = 0; i < n; i++) {
		fl[i] = (uint32_t)get_uint(&r, UINT32_MAX);
		if (fl[i] >= nflow) {
			r.bad = 1;
			break;
		}
		const struct flow_key *f = &flows[fl[i]];
		const struct relay_record *s = &sess[f->sess];
		struct relay_record *o = &out[i];
		memcpy(o->session_id, s->session_id, RELAY_SESSION_ID_LEN);
		memcpy(o->client_ip, s->client_ip, 16);
		o->client_port = s->client_port;
		o->client_family = s->client_family;
		o->rflags = s->rflags;
		o->family = addrs[f->src].fam;
		memcpy(o->src_ip, addrs[f->src].a, 16);
		memcpy(o->dst_ip, addrs[f->dst].a, 16);
		o->src_port = f->sport;
		o->dst_port = f->dport;
		o->direction = f->dir;
		o->pad[0] = 0;
	}
	if (r.bad)
		goto out;
	const uint8_t *flags = get_bytes(&r, n);
	if (!flags)
		goto out;
	for (uint64_t i = 0; i < n; i++)
		out[i].tcp_flags = flags[i];
	for (uint64_t i = 0; i < n; i++)
		out[i].payload_len = (uint16_t)get_uint(&r, UINT16_MAX);
	for (uint64_t i = 0; i < n; i++)
		out[i].window = (uint16_t)(prev[fl[i]] += (uint32_t)unzz32((uint32_t)get_uint(&r, UINT32_MAX)));
	memset(prev, 0, sizeof(*prev) * nflow);
	for (uint64_t i = 0; i < n; i++)
		out[i].seq = prev[fl[i]] += (uint32_t)unzz32((uint32_t)get_uint(&r, UINT32_MAX));
	memset(prev, 0, sizeof(*prev) * nflow);
	for (uint64_t i = 0; i < n; i++)
		out[i].ack = prev[fl[i]] += (uint32_t)unzz32((uint32_t)get_uint(&r, UINT32_MAX));
	if (!r.bad && r.p == r.end)
		ret = (long)n;
out:
	free(sess);
	free(addrs);
	free(flows);
	free(prev);
	free(fl);
	return ret;
}

/* Earliest and latest time of n records (ring order is only nearly time order). */
void relay_block_time_range(const struct relay_record *recs, uint32_t n, uint64_t *range)
{
	range[0] = n ? UINT64_MAX : 0;
	range[1] = 0;
	for (uint32_t i = 0; i < n; i++) {
		if (recs[i].time_ns < range[0])
			range[0] = recs[i].time_ns;
		if (recs[i].time_ns > range[1])
			range[1] = recs[i].time_ns;
	}
}

