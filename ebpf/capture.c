/* tc clsact capture of the TCP/IP headers crossing the relay's TAP device.
 *
 * Compiled by bcc at start-up (relay/capture.py) with these macros set:
 *   RELAY_RING_FD      file descriptor of the BPF ring buffer map
 *   RELAY_WAKE_BYTES   unconsumed bytes above which a submit wakes the drain
 *   RELAY_MAX_SESSIONS capacity of the session map
 * Two programs share the maps: relay_capture_in at ingress (frames the relay
 * wrote for a client, source MAC = session MAC) and relay_capture_out at egress
 * (frames the kernel sends to a client, destination MAC = session MAC).
 *
 * Both always return TC_ACT_OK: the capture observes and never drops traffic,
 * even when the ring is full (then the per-CPU drop counter says so). */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>

#include "record.h"

/* RFC 8200 section 4.1 recommends at most one of each extension header and the
 * destination options twice: 7 is enough for any sane chain, and the bound
 * keeps the verifier happy. Deeper chains are not recorded. */
#define RELAY_MAX_EXT_HDRS 8

/* IPv6 next-header values (IANA protocol numbers). */
#define NH_HOPOPTS 0
#define NH_ROUTING 43
#define NH_FRAGMENT 44
#define NH_AH 51
#define NH_DSTOPTS 60

/* The ring buffer map is created by the loader (relay/capture.py) and named here
 * by its file descriptor, RELAY_RING_FD: bcc's table syntax has no ringbuf_query,
 * which the batched wake-up needs. */
#define RELAY_RING ((void *)bpf_pseudo_fd(1, RELAY_RING_FD))
BPF_HASH(relay_sessions, __u64, struct relay_session, RELAY_MAX_SESSIONS);
BPF_PERCPU_ARRAY(relay_counters, __u64, RELAY_CNT_SLOTS);

static __always_inline void count(int slot)
{
	__u64 *c = relay_counters.lookup(&slot);
	if (c)
		*c += 1;
}

/* Offset and next header past the IPv6 extension headers; -1 when the packet
 * carries no TCP header we can read (non-first fragment, ESP, too deep). */
static __always_inline int skip_ipv6_ext(struct __sk_buff *skb, int off, __u8 *nexthdr)
{
	__u8 nh = *nexthdr;
	__u8 ext[2];
#pragma unroll
	for (int i = 0; i < RELAY_MAX_EXT_HDRS; i++) {
		switch (nh) {
		case IPPROTO_TCP:
			*nexthdr = nh;
			return off;
		case NH_HOPOPTS:
		case NH_ROUTING:
		case NH_DSTOPTS:
			if (bpf_skb_load_bytes(skb, off, ext, 2) < 0)
				return -1;
			nh = ext[0];
			off += (ext[1] + 1) * 8;
			break;
		case NH_AH:
			if (bpf_skb_load_bytes(skb, off, ext, 2) < 0)
				return -1;
			nh = ext[0];
			off += (ext[1] + 2) * 4;
			break;
		case NH_FRAGMENT: {
			__u8 frag[4];
			if (bpf_skb_load_bytes(skb, off, frag, 4) < 0)
				return -1;
			/* Only the first fragment (offset 0) holds the TCP header. */
			if (((frag[2] << 8) | frag[3]) & 0xfff8)
				return -1;
			nh = frag[0];
			off += 8;
			break;
		}
		default:
			return -1;
		}
	}
	if (nh == IPPROTO_TCP) {
		*nexthdr = nh;
		return off;
	}
	return -1;
}

static __always_inline int capture(struct __sk_buff *skb, __u8 direction)
{
	struct ethhdr eth;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return TC_ACT_OK;

	__u8 src[RELAY_ADDR_LEN] = {};
	__u8 dst[RELAY_ADDR_LEN] = {};
	__u8 family;
	int l4off;
	__u32 l3end;   /* offset where the IP datagram ends, for the payload length */
	__u16 proto = bpf_ntohs(eth.h_proto);

	if (proto == ETH_P_IP) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
			return TC_ACT_OK;
		if (ip.protocol != IPPROTO_TCP)
			return TC_ACT_OK;
		/* A non-first fragment has no TCP header. */
		if (bpf_ntohs(ip.frag_off) & 0x1fff)
			return TC_ACT_OK;
		family = RELAY_FAMILY_V4;
		__builtin_memcpy(src, &ip.saddr, 4);
		__builtin_memcpy(dst, &ip.daddr, 4);
		l4off = ETH_HLEN + ip.ihl * 4;
		l3end = ETH_HLEN + bpf_ntohs(ip.tot_len);
	} else if (proto == ETH_P_IPV6) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
			return TC_ACT_OK;
		__u8 nh = ip6.nexthdr;
		l4off = skip_ipv6_ext(skb, ETH_HLEN + sizeof(ip6), &nh);
		if (l4off < 0)
			return TC_ACT_OK;
		family = RELAY_FAMILY_V6;
		__builtin_memcpy(src, &ip6.saddr, 16);
		__builtin_memcpy(dst, &ip6.daddr, 16);
		l3end = ETH_HLEN + sizeof(ip6) + bpf_ntohs(ip6.payload_len);
	} else {
		return TC_ACT_OK;
	}

	struct tcphdr tcp;
	if (bpf_skb_load_bytes(skb, l4off, &tcp, sizeof(tcp)) < 0)
		return TC_ACT_OK;

	/* The session MAC: the source of what the relay writes, the destination of
	 * what the kernel sends. */
	__u64 key = 0;
	__builtin_memcpy(&key, direction == RELAY_DIR_IN ? eth.h_source : eth.h_dest, ETH_ALEN);
	struct relay_session *sess = relay_sessions.lookup(&key);

	struct relay_record *rec = bpf_ringbuf_reserve(RELAY_RING, sizeof(struct relay_record), 0);
	if (!rec) {
		count(RELAY_CNT_DROPS);
		return TC_ACT_OK;
	}
	rec->time_ns = bpf_ktime_get_ns();
	if (sess) {
		__builtin_memcpy(rec->session_id, sess->session_id, RELAY_SESSION_ID_LEN);
		__builtin_memcpy(rec->client_ip, sess->client_ip, RELAY_ADDR_LEN);
		rec->client_port = sess->client_port;
		rec->client_family = sess->client_family;
		rec->rflags = 0;
	} else {
		__builtin_memset(rec->session_id, 0, RELAY_SESSION_ID_LEN);
		__builtin_memset(rec->client_ip, 0, RELAY_ADDR_LEN);
		rec->client_port = 0;
		rec->client_family = 0;
		rec->rflags = RELAY_RF_UNATTRIBUTED;
	}
	__builtin_memcpy(rec->src_ip, src, RELAY_ADDR_LEN);
	__builtin_memcpy(rec->dst_ip, dst, RELAY_ADDR_LEN);
	rec->seq = bpf_ntohl(tcp.seq);
	rec->ack = bpf_ntohl(tcp.ack_seq);
	rec->src_port = bpf_ntohs(tcp.source);
	rec->dst_port = bpf_ntohs(tcp.dest);
	rec->window = bpf_ntohs(tcp.window);
	__u32 tcp_end = l4off + tcp.doff * 4;
	rec->payload_len = l3end > tcp_end ? (__u16)(l3end - tcp_end) : 0;
	rec->gso_segs = 0;
	rec->gso_size = 0;
	if (skb->gso_segs > 1 && skb->gso_size) {
		/* A GSO packet (forwarded traffic merged by GRO on the uplink) reaches
		 * tc egress before it is cut into the packets that cross the device:
		 * record how it will be cut; the drain makes one record per packet.
		 * Its IP length may not cover it all: the payload is the skb's. */
		__u32 total = skb->len > tcp_end ? skb->len - tcp_end : 0;
		rec->payload_len = total > 0xffff ? 0xffff : (__u16)total;
		rec->gso_segs = skb->gso_segs > 0xffff ? 0xffff : (__u16)skb->gso_segs;
		rec->gso_size = skb->gso_size > 0xffff ? 0xffff : (__u16)skb->gso_size;
	}
	rec->family = family;
	rec->direction = direction;
	/* The flags byte follows doff/reserved in the header: byte 13. */
	rec->tcp_flags = ((__u8 *)&tcp)[13];
	rec->pad[0] = 0;
	__builtin_memset(rec->pad2, 0, sizeof(rec->pad2));

	count(RELAY_CNT_RECORDS);
	/* Batched wake-ups: the drain polls on a timer anyway, so only wake it when
	 * the ring is filling up. */
	__u64 flags = bpf_ringbuf_query(RELAY_RING, BPF_RB_AVAIL_DATA) > RELAY_WAKE_BYTES
		? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
	bpf_ringbuf_submit(rec, flags);
	return TC_ACT_OK;
}

int relay_capture_in(struct __sk_buff *skb)
{
	return capture(skb, RELAY_DIR_IN);
}

int relay_capture_out(struct __sk_buff *skb)
{
	return capture(skb, RELAY_DIR_OUT);
}
