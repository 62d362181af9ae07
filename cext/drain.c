/* The packet-log drain in C: no Python per record. The BPF ring buffer is
 * mmapped as libbpf does (consumer page read-write, producer page and the data
 * pages, mapped twice by the kernel so a record never wraps, read-only) and
 * records are copied in batches into the drain's record block, their monotonic
 * timestamps turned to wall clock; blockcodec.c encodes the block. */
#include "drain.h"

#include <errno.h>
#include <linux/bpf.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

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
