/* The few bpf(2) calls the Python side needs without bcc: ring buffer creation,
 * pinning, pinned-object lookup, map updates and per-CPU counters, so that the
 * control command works from another process without compiling anything. */
#include "bpf.h"

#include <linux/bpf.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

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
