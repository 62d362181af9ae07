/* The datapath's batches; see batch.h, and for the rules the pure-Python twin
 * relay/serve/batch_py.py. Packets come from clients and the kernel: every span
 * is checked against its buffer before a byte of it is read. */
#include "batch.h"

#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

_Static_assert(sizeof(struct sockaddr_in6) == RELAY_BATCH_ADDR_SIZE,
	       "an address slot holds a sockaddr_in6");

#define IPV4_MIN_HDR 20
#define ARP_IPV4_LEN 28  /* ARP for IPv4 over Ethernet: header, sender and target */
#define ARP_SENDER_MAC 8  /* offsets in the ARP packet */
#define ARP_SENDER_IP 14
#define IPV4_SRC 12
/* Messages handed to the kernel per recvmmsg / sendmmsg call (the stack holds
 * their headers); a longer batch is sent in several calls. */
#define MMSG_CHUNK 64

static const uint8_t ETHERTYPE_IPV4[2] = {0x08, 0x00};
static const uint8_t ETHERTYPE_IPV6[2] = {0x86, 0xdd};
static const uint8_t ETHERTYPE_ARP[2] = {0x08, 0x06};

static inline int in_buf(size_t buf_len, size_t off, size_t len)
{
	return off <= buf_len && len <= buf_len - off;
}

long relay_batch_tap_read(int fd, uint8_t *buf, size_t cap, size_t frame_max,
			  size_t max_frames, uint32_t *spans, int *err)
{
	size_t pos = 0;
	long n = 0;
	*err = 0;
	while ((size_t)n < max_frames && cap - pos >= frame_max) {
		ssize_t got = read(fd, buf + pos, frame_max);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				*err = errno;
			break;
		}
		if (got < RELAY_BATCH_ETH_HLEN)
			continue;
		spans[2 * n] = (uint32_t)pos;
		spans[2 * n + 1] = (uint32_t)got;
		n++;
		pos += (size_t)got;
	}
	return n;
}

size_t relay_batch_group_by_mac(const uint8_t *buf, uint32_t *spans, size_t n, uint32_t *groups)
{
	/* Each frame's group by a linear search of the groups so far (a wake-up's
	 * frames go to few sessions), then a stable counting sort. The first 6 bytes
	 * of every frame exist: relay_batch_tap_read drops shorter frames. */
	uint16_t group_of[RELAY_BATCH_GROUP_MAX];
	uint32_t sorted[2 * RELAY_BATCH_GROUP_MAX];
	uint32_t fill[RELAY_BATCH_GROUP_MAX];
	size_t m = n < RELAY_BATCH_GROUP_MAX ? n : RELAY_BATCH_GROUP_MAX;
	size_t ng = 0;
	for (size_t i = 0; i < m; i++) {
		const uint8_t *mac = buf + spans[2 * i];
		size_t g = 0;
		while (g < ng && memcmp(buf + spans[2 * groups[2 * g]], mac, RELAY_BATCH_MAC_LEN))
			g++;
		if (g == ng) {
			groups[2 * ng] = (uint32_t)i;  /* its first frame, while grouping */
			groups[2 * ng + 1] = 0;
			ng++;
		}
		groups[2 * g + 1]++;
		group_of[i] = (uint16_t)g;
	}
	uint32_t start = 0;
	for (size_t g = 0; g < ng; g++) {
		groups[2 * g] = fill[g] = start;
		start += groups[2 * g + 1];
	}
	for (size_t i = 0; i < m; i++) {
		uint32_t at = fill[group_of[i]]++;
		sorted[2 * at] = spans[2 * i];
		sorted[2 * at + 1] = spans[2 * i + 1];
	}
	memcpy(spans, sorted, 2 * m * sizeof(uint32_t));
	for (size_t i = m; i < n; i++) {  /* past the bound: a group each, in order */
		groups[2 * ng] = (uint32_t)i;
		groups[2 * ng + 1] = 1;
		ng++;
	}
	return ng;
}

long relay_batch_tap_write(int fd, const uint8_t *head, size_t head_len, const uint8_t *buf,
			   size_t buf_len, const uint32_t *spans, size_t n, uint64_t *bytes,
			   uint32_t *errors, int *err)
{
	long written = 0;
	*bytes = 0;
	*errors = 0;
	*err = 0;
	struct iovec iov[2] = {{(void *)head, head_len}, {NULL, 0}};
	for (size_t i = 0; i < n; i++) {
		size_t off = spans[2 * i], len = spans[2 * i + 1];
		if (!in_buf(buf_len, off, len))
			continue;
		iov[1].iov_base = (void *)(buf + off);
		iov[1].iov_len = len;
		ssize_t w;
		do
			w = writev(fd, head_len ? iov : iov + 1, head_len ? 2 : 1);
		while (w < 0 && errno == EINTR);
		if (w < 0) {
			(*errors)++;
			*err = errno;
			continue;
		}
		written++;
		*bytes += len;
	}
	return written;
}

static int ipv4_from(const uint8_t *p, size_t len, const uint8_t *src)
{
	return len >= IPV4_MIN_HDR && p[0] >> 4 == 4 && !memcmp(p + IPV4_SRC, src, 4);
}

size_t relay_batch_from_ipv4(const uint8_t *buf, size_t buf_len, const uint32_t *spans, size_t n,
			     const uint8_t *src, uint32_t *out)
{
	size_t kept = 0;
	for (size_t i = 0; i < n; i++) {
		size_t off = spans[2 * i], len = spans[2 * i + 1];
		if (!in_buf(buf_len, off, len) || !ipv4_from(buf + off, len, src))
			continue;
		out[2 * kept] = (uint32_t)off;
		out[2 * kept + 1] = (uint32_t)len;
		kept++;
	}
	return kept;
}

size_t relay_batch_frames_from(const uint8_t *buf, size_t buf_len, const uint32_t *spans,
			       size_t n, const uint8_t *mac, const uint8_t *ip, uint32_t *frames,
			       uint32_t *ips, size_t *n_ip, uint32_t *spoofed, uint32_t *not_ipv4)
{
	size_t kept = 0;
	*n_ip = 0;
	*spoofed = *not_ipv4 = 0;
	for (size_t i = 0; i < n; i++) {
		size_t off = spans[2 * i], len = spans[2 * i + 1];
		if (!in_buf(buf_len, off, len) || len < RELAY_BATCH_ETH_HLEN
		    || memcmp(buf + off + RELAY_BATCH_MAC_LEN, mac, RELAY_BATCH_MAC_LEN)) {
			(*spoofed)++;
			continue;
		}
		const uint8_t *f = buf + off, *type = f + 2 * RELAY_BATCH_MAC_LEN;
		const uint8_t *l3 = f + RELAY_BATCH_ETH_HLEN;
		size_t l3_len = len - RELAY_BATCH_ETH_HLEN;
		if (!memcmp(type, ETHERTYPE_IPV4, 2)) {
			if (!ipv4_from(l3, l3_len, ip)) {
				(*spoofed)++;
				continue;
			}
			ips[2 * *n_ip] = (uint32_t)(off + RELAY_BATCH_ETH_HLEN);
			ips[2 * *n_ip + 1] = (uint32_t)l3_len;
			(*n_ip)++;
		} else if (!memcmp(type, ETHERTYPE_ARP, 2)) {
			if (l3_len < ARP_IPV4_LEN
			    || memcmp(l3 + ARP_SENDER_MAC, mac, RELAY_BATCH_MAC_LEN)
			    || memcmp(l3 + ARP_SENDER_IP, ip, 4)) {
				(*spoofed)++;
				continue;
			}
		} else {
			(*not_ipv4)++;
			continue;
		}
		frames[2 * kept] = (uint32_t)off;
		frames[2 * kept + 1] = (uint32_t)len;
		kept++;
	}
	return kept;
}

size_t relay_batch_ip_payloads(const uint8_t *buf, size_t buf_len, const uint32_t *spans,
			       size_t n, int allow_ipv6, uint32_t *out)
{
	size_t kept = 0;
	for (size_t i = 0; i < n; i++) {
		size_t off = spans[2 * i], len = spans[2 * i + 1];
		if (!in_buf(buf_len, off, len) || len < RELAY_BATCH_ETH_HLEN)
			continue;
		const uint8_t *type = buf + off + 2 * RELAY_BATCH_MAC_LEN;
		if (memcmp(type, ETHERTYPE_IPV4, 2) && !(allow_ipv6 && !memcmp(type, ETHERTYPE_IPV6, 2)))
			continue;
		out[2 * kept] = (uint32_t)(off + RELAY_BATCH_ETH_HLEN);
		out[2 * kept + 1] = (uint32_t)(len - RELAY_BATCH_ETH_HLEN);
		kept++;
	}
	return kept;
}

long relay_batch_udp_recv(int fd, uint8_t *buf, size_t slot, size_t n, uint32_t *spans,
			  uint8_t *addrs)
{
	long total = 0;
	while ((size_t)total < n) {
		struct mmsghdr msgs[MMSG_CHUNK];
		struct iovec iov[MMSG_CHUNK];
		size_t want = n - (size_t)total < MMSG_CHUNK ? n - (size_t)total : MMSG_CHUNK;
		memset(msgs, 0, want * sizeof(msgs[0]));
		for (size_t i = 0; i < want; i++) {
			size_t k = (size_t)total + i;
			iov[i].iov_base = buf + k * slot;
			iov[i].iov_len = slot;
			msgs[i].msg_hdr.msg_iov = &iov[i];
			msgs[i].msg_hdr.msg_iovlen = 1;
			msgs[i].msg_hdr.msg_name = addrs + k * RELAY_BATCH_ADDR_SIZE;
			msgs[i].msg_hdr.msg_namelen = RELAY_BATCH_ADDR_SIZE;
			memset(addrs + k * RELAY_BATCH_ADDR_SIZE, 0, RELAY_BATCH_ADDR_SIZE);
		}
		int got = recvmmsg(fd, msgs, (unsigned)want, MSG_DONTWAIT, NULL);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK || total > 0)
				return total;
			return -errno;
		}
		for (int i = 0; i < got; i++) {
			size_t k = (size_t)total + (size_t)i;
			spans[2 * k] = (uint32_t)(k * slot);
			spans[2 * k + 1] = msgs[i].msg_len;
		}
		total += got;
		if ((size_t)got < want)
			break;
	}
	return total;
}

long relay_batch_udp_send(int fd, const uint8_t *buf, size_t buf_len, const uint32_t *spans,
			  size_t n, const uint8_t *addr, uint32_t addr_len)
{
	long total = 0;
	size_t i = 0;
	while (i < n) {
		struct mmsghdr msgs[MMSG_CHUNK];
		struct iovec iov[MMSG_CHUNK];
		size_t want = 0;
		for (; i < n && want < MMSG_CHUNK; i++) {
			size_t off = spans[2 * i], len = spans[2 * i + 1];
			if (!in_buf(buf_len, off, len))
				continue;
			iov[want].iov_base = (void *)(buf + off);
			iov[want].iov_len = len;
			memset(&msgs[want], 0, sizeof(msgs[want]));
			msgs[want].msg_hdr.msg_iov = &iov[want];
			msgs[want].msg_hdr.msg_iovlen = 1;
			msgs[want].msg_hdr.msg_name = (void *)addr;
			msgs[want].msg_hdr.msg_namelen = addr_len;
			want++;
		}
		if (!want)
			break;
		int sent;
		do
			sent = sendmmsg(fd, msgs, (unsigned)want, MSG_DONTWAIT);
		while (sent < 0 && errno == EINTR);
		if (sent < 0)
			return total > 0 ? total : -errno;
		total += sent;
		if ((size_t)sent < want)
			break;  /* the socket's buffer is full: the rest are dropped */
	}
	return total;
}
