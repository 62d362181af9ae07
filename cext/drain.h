/* The packet-log drain: BPF ring buffer -> record block -> encoded block bytes,
 * and the few bpf(2) calls the Python side needs without bcc (pinning, counters,
 * another process's status). See drain.c. */
#ifndef RELAY_DRAIN_H
#define RELAY_DRAIN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "record.h"

struct relay_drain;

int relay_bpf_ringbuf_create(uint32_t ring_bytes);
int relay_bpf_obj_pin(int fd, const char *path);
int relay_bpf_obj_get(const char *path);
int relay_bpf_map_update(int fd, const void *key, const void *value);
int relay_bpf_map_delete(int fd, const void *key);
int relay_bpf_percpu_u64(int fd, uint32_t slot, uint64_t *out, int ncpus);
int relay_bpf_prog_id(int fd, uint32_t *id);

struct relay_drain *relay_drain_open(int ring_fd, uint32_t ring_bytes, uint32_t block_records);
void relay_drain_close(struct relay_drain *d);
long relay_drain_run(struct relay_drain *d, long max_records);
uint64_t relay_drain_ring_used(const struct relay_drain *d);
uint32_t relay_drain_buffered(const struct relay_drain *d);
struct relay_record *relay_drain_records(struct relay_drain *d);
void relay_drain_reset(struct relay_drain *d);
uint64_t relay_drain_total(const struct relay_drain *d);

long relay_block_bound(uint32_t n);
long relay_block_encode(const struct relay_record *recs, uint32_t n, uint8_t *out, size_t cap);
long relay_block_count(const uint8_t *in, size_t len);
long relay_block_decode(const uint8_t *in, size_t len, struct relay_record *out, uint32_t cap);
void relay_block_time_range(const struct relay_record *recs, uint32_t n, uint64_t *range);

#endif
