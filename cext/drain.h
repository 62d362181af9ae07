/* The packet-log drain: BPF ring buffer -> record block (see drain.c). */
#ifndef RELAY_DRAIN_H
#define RELAY_DRAIN_H

#include <stdint.h>

#include "record.h"

struct relay_drain;

struct relay_drain *relay_drain_open(int ring_fd, uint32_t ring_bytes, uint32_t block_records);
void relay_drain_close(struct relay_drain *d);
long relay_drain_run(struct relay_drain *d, long max_records);
uint64_t relay_drain_ring_used(const struct relay_drain *d);
uint32_t relay_drain_buffered(const struct relay_drain *d);
struct relay_record *relay_drain_records(struct relay_drain *d);
void relay_drain_reset(struct relay_drain *d);
uint64_t relay_drain_total(const struct relay_drain *d);

#endif
