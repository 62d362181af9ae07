/* The packet-log drain in C: no Python per record.
 *
 * 1. bpf(2) helpers: ring buffer creation, pinning, pinned-object lookup, map
 *    updates and per-CPU counters, so the control command works from another
 *    process without compiling anything with bcc.
 * 2. The ring buffer consumer: the map is mmapped as libbpf does (consumer page
 *    read-write, producer page and the data pages, mapped twice by the kernel so
 *    a record never wraps, read-only) and records are copied in batches into the
 *    drain's record block, their monotonic timestamps turned to wall clock.
 * 3. The block codec: a block of records <-> the columnar byte layout described in
 *    relay/packetlog.py (the Python side only compresses it with zstd and writes). */
#include "drain.h"

#include <errno.h>
#include <linux/bpf.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ bpf(2) */

static long sys_bpf(int cmd, union bpf_attr *attr)
{
	return syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

int relay_bpf_ringbuf_create(uint32_t ring_bytes)
{
	union bpf_attr a;
	memset(&a, 0, sizeof(a));
	a.map_type = BPF_MAP_TYPE_RINGBUF;
	a.max_entries = ring_bytes;
	strncpy(a.map_name, "relay_events", sizeof(a.map_name) - 1);
	return (int)sys_bpf(BPF_MAP_CREATE, &a);
}

int relay_bpf_obj_pin(int fd, const char *path)
{
	union bpf_attr a;
	memset(&a, 0, sizeof(a));
	a.bpf_fd = (uint32_t)fd;
	a.pathname = (uint64_t)(uintptr_t)path;
	return (int)sys_bpf(BPF_OBJ_PIN, &a);
}

int relay_bpf_obj_get(const char *path)
{
	union bpf_attr a;
	memset(&a, 0, sizeof(a));
	a.pathname = (uint64_t)(uintptr_t)path;
	return (int)sys_bpf(BPF_OBJ_GET, &a);
}

int relay_bpf_map_update(int fd, const void *key, const void *value)
{
	union bpf_attr a;
	memset(&a, 0, sizeof(a));
	a.map_fd = (uint32_t)fd;
	a.key = (uint64_t)(uintptr_t)key;
	a.value = (uint64_t)(uintptr_t)value;
	a.flags = BPF_ANY;
	return (int)sys_bpf(BPF_MAP_UPDATE_ELEM, &a);
}

int relay_bpf_map_delete(int fd, const void *key)
{
	union bpf_attr a;
	memset(&a, 0, sizeof(a));
	a.map_fd = (uint32_t)fd;
	a.key = (uint64_t)(uintptr_t)key;
	return (int)sys_bpf(BPF_MAP_DELETE_ELEM, &a);
}

/* Values of one slot of a per-CPU u64 array; out has room for ncpus values (the
 * kernel writes one per possible CPU, each in an 8-byte slot). */
int relay_bpf_percpu_u64(int fd, uint32_t slot, uint64_t *out, int ncpus)
{
	union bpf_attr a;
	memset(&a, 0, sizeof(a));
	memset(out, 0, sizeof(uint64_t) * (size_t)ncpus);
	a.map_fd = (uint32_t)fd;
	a.key = (uint64_t)(uintptr_t)&slot;
	a.value = (uint64_t)(uintptr_t)out;
	return (int)sys_bpf(BPF_MAP_LOOKUP_ELEM, &a);
}

int relay_bpf_prog_id(int fd, uint32_t *id)
{
	struct bpf_prog_info info;
	union bpf_attr a;
	memset(&info, 0, sizeof(info));
	memset(&a, 0, sizeof(a));
	a.info.bpf_fd = (uint32_t)fd;
	a.info.info_len = sizeof(info);
	a.info.info = (uint64_t)(uintptr_t)&info;
	if (sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &a) < 0)
		return -1;
	*id = info.id;
	return 0;
}

/* ------------------------------------------------------------- the drain */

/* Ring buffer record header bits (include/uapi/linux/bpf.h). */
#define RB_BUSY BPF_RINGBUF_BUSY_BIT
#define RB_DISCARD BPF_RINGBUF_DISCARD_BIT
#define RB_HDR BPF_RINGBUF_HDR_SZ

struct relay_drain {
	int fd;
	size_t page;
	uint64_t mask;
	uint64_t *consumer;           /* rw page */
	const uint64_t *producer;     /* first ro page */
	const uint8_t *data;          /* 2 x ring_bytes, ro */
	struct relay_record *recs;
	uint32_t cap;
	uint32_t n;
	uint64_t total;
};

struct relay_drain *relay_drain_open(int ring_fd, uint32_t ring_bytes, uint32_t block_records)
{
	struct relay_drain *d = calloc(1, sizeof(*d));
	if (!d)
		return NULL;
	d->fd = ring_fd;
	d->page = (size_t)sysconf(_SC_PAGESIZE);
	d->mask = ring_bytes - 1;
	d->cap = block_records;
	d->recs = calloc(block_records, sizeof(struct relay_record));
	void *c = mmap(NULL, d->page, PROT_READ | PROT_WRITE, MAP_SHARED, ring_fd, 0);
	void *p = c == MAP_FAILED ? MAP_FAILED
		: mmap(NULL, d->page + 2 * (size_t)ring_bytes, PROT_READ, MAP_SHARED, ring_fd,
		       (off_t)d->page);
	if (!d->recs || c == MAP_FAILED || p == MAP_FAILED) {
		int err = errno;
		if (c != MAP_FAILED)
			munmap(c, d->page);
		free(d->recs);
		free(d);
		errno = err;
		return NULL;
	}
	d->consumer = c;
	d->producer = p;
	d->data = (const uint8_t *)p + d->page;
	return d;
}

void relay_drain_close(struct relay_drain *d)
{
	if (!d)
		return;
	munmap(d->consumer, d->page);
	munmap((void *)d->producer, d->page + 2 * (size_t)(d->mask + 1));
	free(d->recs);
	free(d);
}

static int64_t mono_to_wall_offset(void)
{
	struct timespec rt, mono;
	clock_gettime(CLOCK_REALTIME, &rt);
	clock_gettime(CLOCK_MONOTONIC, &mono);
	return ((int64_t)rt.tv_sec - mono.tv_sec) * 1000000000LL + (rt.tv_nsec - mono.tv_nsec);
}

#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_CWR 0x80

/* Copy one ring record into the block as the `segs` packets it stands for (one,
 * unless it is a GSO packet), cut as tcp_gso_segment() cuts: consecutive
 * sequence numbers, gso_size bytes each but the last, FIN and PSH on the last
 * only, CWR on the first only. Returns the records made (segs, or what fits). */
static uint32_t expand(struct relay_drain *d, const struct relay_record *src, uint32_t segs,
		       int64_t wall_off)
{
	uint32_t size = segs > 1 ? src->gso_size : src->payload_len;
	uint32_t payload = src->payload_len;
	uint32_t room = d->cap - d->n;
	if (segs > room)
		segs = room;
	for (uint32_t i = 0; i < segs; i++) {
		struct relay_record *r = &d->recs[d->n++];
		memcpy(r, src, sizeof(*r));
		r->time_ns = (uint64_t)((int64_t)r->time_ns + wall_off);
		r->gso_segs = 0;
		r->gso_size = 0;
		if (src->gso_segs > 1) {
			uint32_t done = i * size;
			uint32_t left = payload > done ? payload - done : 0;
			r->seq = src->seq + done;
			r->payload_len = (uint16_t)(left < size ? left : size);
			if (i + 1 < src->gso_segs)
				r->tcp_flags &= (uint8_t)~(TCP_FIN | TCP_PSH);
			if (i > 0)
				r->tcp_flags &= (uint8_t)~TCP_CWR;
		}
	}
	return segs;
}

/* Consume up to max_records (and at most what still fits in the block) from the
 * ring into the block; returns how many were taken. */
long relay_drain_run(struct relay_drain *d, long max_records)
{
	/* bpf_ktime_get_ns() is CLOCK_MONOTONIC; taken once per batch, the offset
	 * follows NTP steps within one drain interval. */
	int64_t off = mono_to_wall_offset();
	uint64_t cons = __atomic_load_n(d->consumer, __ATOMIC_ACQUIRE);
	long taken = 0;
	while (taken < max_records && d->n < d->cap) {
		uint64_t prod = __atomic_load_n(d->producer, __ATOMIC_ACQUIRE);
		if (cons >= prod)
			break;
		while (cons < prod && taken < max_records && d->n < d->cap) {
			const uint32_t *hdr = (const uint32_t *)(d->data + (cons & d->mask));
			uint32_t len = __atomic_load_n(hdr, __ATOMIC_ACQUIRE);
			if (len & RB_BUSY)
				goto done;
			uint32_t body = len & ~(RB_BUSY | RB_DISCARD);
			if (!(len & RB_DISCARD) && body == sizeof(struct relay_record)) {
				const struct relay_record *src =
					(const void *)((const uint8_t *)hdr + RB_HDR);
				uint32_t segs = src->gso_segs > 1 ? src->gso_segs : 1;
				/* A GSO record expands into segs records: wait for room in
				 * the block (an empty block always has it, cap >= 64Ki/1). */
				if (segs > d->cap - d->n && d->n > 0)
					goto done;
				uint32_t made = expand(d, src, segs, off);
				taken += made;
			}
			cons += (body + RB_HDR + 7) & ~7ULL;
		}
		__atomic_store_n(d->consumer, cons, __ATOMIC_RELEASE);
	}
done:
	__atomic_store_n(d->consumer, cons, __ATOMIC_RELEASE);
	d->total += (uint64_t)taken;
	return taken;
}

uint64_t relay_drain_ring_used(const struct relay_drain *d)
{
	return __atomic_load_n(d->producer, __ATOMIC_ACQUIRE)
		- __atomic_load_n(d->consumer, __ATOMIC_ACQUIRE);
}

uint32_t relay_drain_buffered(const struct relay_drain *d) { return d->n; }
struct relay_record *relay_drain_records(struct relay_drain *d) { return d->recs; }
void relay_drain_reset(struct relay_drain *d) { d->n = 0; }
uint64_t relay_drain_total(const struct relay_drain *d) { return d->total; }

/* --------------------------------------------------------- block codec */

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

static uint64_t get_varint(struct reader *r)
{
	uint64_t v = 0;
	for (int shift = 0; shift < 64; shift += 7) {
		if (r->p >= r->end) {
			r->bad = 1;
			return 0;
		}
		uint8_t b = *r->p++;
		v |= (uint64_t)(b & 0x7f) << shift;
		if (!(b & 0x80))
			return v;
	}
	r->bad = 1;
	return 0;
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
		flows[k].sess = (uint32_t)get_varint(&r);
		const uint8_t *d = get_bytes(&r, 1);
		flows[k].src = (uint32_t)get_varint(&r);
		flows[k].dst = (uint32_t)get_varint(&r);
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
		fl[i] = (uint32_t)get_varint(&r);
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
		out[i].payload_len = (uint16_t)get_varint(&r);
	for (uint64_t i = 0; i < n; i++)
		out[i].window = (uint16_t)(prev[fl[i]] += (uint32_t)unzz32((uint32_t)get_varint(&r)));
	memset(prev, 0, sizeof(*prev) * nflow);
	for (uint64_t i = 0; i < n; i++)
		out[i].seq = prev[fl[i]] += (uint32_t)unzz32((uint32_t)get_varint(&r));
	memset(prev, 0, sizeof(*prev) * nflow);
	for (uint64_t i = 0; i < n; i++)
		out[i].ack = prev[fl[i]] += (uint32_t)unzz32((uint32_t)get_varint(&r));
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
