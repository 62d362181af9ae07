/* bpf(2) wrappers: see bpf.c. Each returns what the syscall does (a file
 * descriptor, 0, or -1 with errno set). */
#ifndef RELAY_BPF_H
#define RELAY_BPF_H

#include <stdint.h>

int relay_bpf_ringbuf_create(uint32_t ring_bytes);
int relay_bpf_obj_pin(int fd, const char *path);
int relay_bpf_obj_get(const char *path);
int relay_bpf_map_update(int fd, const void *key, const void *value);
int relay_bpf_map_delete(int fd, const void *key);
int relay_bpf_percpu_u64(int fd, uint32_t slot, uint64_t *out, int ncpus);
int relay_bpf_prog_id(int fd, uint32_t *id);

#endif
