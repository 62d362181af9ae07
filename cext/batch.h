/* The datapath's batches: frames read from and written to the TAP device,
 * datagrams received and sent by the thousand with recvmmsg/sendmmsg, the source
 * check of a session's packets and the payloads of the frames the kernel sends
 * it, each a loop in C over all the packets of one wake-up. The rules and the
 * pure-Python twin are in relay/serve/batch_py.py (relay/serve/batch.py wraps
 * this file). A packet is buf[spans[2i] .. spans[2i] + spans[2i+1]). */
#ifndef RELAY_BATCH_H
#define RELAY_BATCH_H

#include <stddef.h>
#include <stdint.h>

#define RELAY_BATCH_ETH_HLEN 14
#define RELAY_BATCH_MAC_LEN 6
/* Room for any socket address the UDP endpoint sees (sizeof(struct sockaddr_in6)). */
#define RELAY_BATCH_ADDR_SIZE 28

/* Read frames from fd (a TAP device: one frame per read) into buf until it would
 * block, max_frames are read, or fewer than frame_max bytes of room are left;
 * frames shorter than an Ethernet header are dropped. Returns the number read;
 * *err is the errno of a failed read other than EAGAIN, else 0. */
long relay_batch_tap_read(int fd, uint8_t *buf, size_t cap, size_t frame_max,
			  size_t max_frames, uint32_t *spans, int *err);

/* Order the frames so that those for the same destination MAC (their first 6
 * bytes) are together, in their order: spans[] is rewritten, groups[2g] is a
 * group's first frame and groups[2g+1] its length (groups has room for 2n).
 * Frames past RELAY_BATCH_GROUP_MAX are a group each. Returns the number of groups. */
#define RELAY_BATCH_GROUP_MAX 1024
size_t relay_batch_group_by_mac(const uint8_t *buf, uint32_t *spans, size_t n, uint32_t *groups);

/* Write each packet to fd after head[0 .. head_len) (writev: one frame per write).
 * Returns the number written, their bytes (without the head) in *bytes; a failed
 * write is counted in *errors, its errno in *err. */
long relay_batch_tap_write(int fd, const uint8_t *head, size_t head_len, const uint8_t *buf,
			   size_t buf_len, const uint32_t *spans, size_t n, uint64_t *bytes,
			   uint32_t *errors, int *err);

/* Client -> kernel: keep the IPv4 packets from src (4 bytes), at least a minimal
 * header long (attribution in the logs relies on no client sending as another);
 * their spans go to out. Returns the number kept. */
size_t relay_batch_from_ipv4(const uint8_t *buf, size_t buf_len, const uint32_t *spans, size_t n,
			     const uint8_t *src, uint32_t *out);

/* The same for Ethernet frames of a bridged client: from mac, and IPv4 from ip or
 * ARP with mac and ip as the sender; frames go to frames[], the IPv4 packets in
 * them (Ethernet header off) also to ips[] (*n_ip of them). Others are counted in
 * *spoofed, or in *not_ipv4 (another ethertype). Returns the number of frames kept. */
size_t relay_batch_frames_from(const uint8_t *buf, size_t buf_len, const uint32_t *spans,
			       size_t n, const uint8_t *mac, const uint8_t *ip, uint32_t *frames,
			       uint32_t *ips, size_t *n_ip, uint32_t *spoofed, uint32_t *not_ipv4);

/* Kernel -> client: the IP packets (Ethernet header off) of the frames whose
 * ethertype is IPv4, or also IPv6 with allow_ipv6. Returns how many went to out. */
size_t relay_batch_ip_payloads(const uint8_t *buf, size_t buf_len, const uint32_t *spans,
			       size_t n, int allow_ipv6, uint32_t *out);

/* recvmmsg: at most n datagrams, datagram i into buf + i * slot (its span in
 * spans), its source address into addrs + i * RELAY_BATCH_ADDR_SIZE (zero padded).
 * A datagram longer than slot is cut to it (the caller's slot is one more than
 * it accepts, so a cut one is refused). Returns the number received (0 when none
 * is waiting), or -errno. */
long relay_batch_udp_recv(int fd, uint8_t *buf, size_t slot, size_t n, uint32_t *spans,
			  uint8_t *addrs);

/* sendmmsg: the packets to one address (addr, addr_len bytes). Returns the number
 * the kernel took (the rest are the caller's to drop), or -errno when none. */
long relay_batch_udp_send(int fd, const uint8_t *buf, size_t buf_len, const uint32_t *spans,
			  size_t n, const uint8_t *addr, uint32_t addr_len);

#endif
