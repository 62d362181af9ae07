/* The packet-log block codec (see blockcodec.c). */
#ifndef RELAY_BLOCKCODEC_H
#define RELAY_BLOCKCODEC_H

#include <stddef.h>
#include <stdint.h>

#include "record.h"

long relay_block_bound(uint32_t n);
long relay_block_encode(const struct relay_record *recs, uint32_t n, uint8_t *out, size_t cap);
long relay_block_count(const uint8_t *in, size_t len);
long relay_block_decode(const uint8_t *in, size_t len, struct relay_record *out, uint32_t cap);
void relay_block_time_range(const struct relay_record *recs, uint32_t n, uint64_t *range);

#endif
