/* Steering of the relay's traffic to its datapath workers (relay/serve/steer.py).
 *
 * Compiled by bcc at start-up by the control plane, which fills the maps; each
 * program returns the index of a worker:
 *
 *   relay_steer_tap      TUNSETSTEERINGEBPF program of the multi-queue TAP device:
 *                        the queue of the worker that owns the frame's destination
 *                        MAC (a session's), 0 for any other frame. Queue i is
 *                        worker i's (the control plane holds every queue, so no
 *                        queue is ever renumbered).
 *   relay_steer_openvpn  SO_ATTACH_REUSEPORT_EBPF program of OpenVPN's UDP sockets
 *                        (socket i is worker i's): a DATA_V2 packet goes to the
 *                        worker whose index is its peer id's top byte, whatever
 *                        its source (a client that floated to a new address);
 *                        anything else from an address in relay_steer_openvpn_peers
 *                        to the worker named there.
 *   relay_steer_dtls     the same for the DTLS sockets on the CSTP port: a
 *                        ClientHello goes to the worker whose index is the first
 *                        byte of its session_id (the App-ID the worker gave the
 *                        session), anything else from an address in
 *                        relay_steer_dtls_peers to the worker named there.
 *   relay_steer_tcp      SO_ATTACH_REUSEPORT_EBPF program of the TCP listeners
 *                        (CSTP, OpenVPN over TCP): a new connection goes to the
 *                        worker in relay_steer_least, the one with the fewest
 *                        connections, which the control plane keeps up to date.
 *
 * A reuseport program that returns an index past the group's sockets
 * (RELAY_STEER_HASH) leaves the choice to the kernel's 4-tuple hash, which keeps
 * every datagram of one client address on one worker. A reuseport program sees
 * the UDP payload at offset 0 and the IP header through BPF_HDR_START_NET.
 *
 * Macros, from relay/serve/steer.py (values of relay.protocols.*):
 *   RELAY_STEER_SESSIONS       capacity of each map
 *   RELAY_OPCODE_SHIFT, RELAY_P_DATA_V2           OpenVPN's first byte
 *   RELAY_DTLS_RECORD_HEADER, RELAY_DTLS_HANDSHAKE_HEADER, RELAY_DTLS_RANDOM_END,
 *   RELAY_DTLS_CONTENT_HANDSHAKE, RELAY_DTLS_CLIENT_HELLO, RELAY_DTLS_APP_ID_LEN
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

/* An index no group has: the kernel's hash decides. */
#define RELAY_STEER_HASH 0xFFFFFFFF
#define IPV6_HEADER_LEN 40
#define IPV6_NEXTHDR_OFF 6
#define IPV6_SADDR_OFF 8
#define IPV4_SADDR_OFF 12

/* A client's address: IPv6, or IPv4 as ::ffff:a.b.c.d, and its port in network order. */
struct relay_peer {
	__u8 addr[16];
	__u16 port;
	__u16 pad;
};

BPF_HASH(relay_steer_macs, __u64, __u32, RELAY_STEER_SESSIONS);
BPF_HASH(relay_steer_openvpn_peers, struct relay_peer, __u32, RELAY_STEER_SESSIONS);
BPF_HASH(relay_steer_dtls_peers, struct relay_peer, __u32, RELAY_STEER_SESSIONS);
BPF_ARRAY(relay_steer_least, __u32, 1);

int relay_steer_tap(struct __sk_buff *skb)
{
	__u64 mac = 0; /* the MAC's 6 bytes at the start of a little-endian u64, as capture.c */
	if (bpf_skb_load_bytes(skb, 0, &mac, 6) < 0)
		return 0;
	__u32 *queue = relay_steer_macs.lookup(&mac);
	return queue ? *queue : 0;
}

/* The datagram's source address; -1 when it is not one we read (IPv6 with
 * extension headers before UDP). */
static __always_inline int source(struct __sk_buff *skb, struct relay_peer *peer)
{
	__u8 first;
	if (bpf_skb_load_bytes_relative(skb, 0, &first, 1, BPF_HDR_START_NET) < 0)
		return -1;
	int udp;
	if ((first >> 4) == 4) {
		peer->addr[10] = 0xff;
		peer->addr[11] = 0xff;
		if (bpf_skb_load_bytes_relative(skb, IPV4_SADDR_OFF, &peer->addr[12], 4,
						BPF_HDR_START_NET) < 0)
			return -1;
		udp = (first & 0x0f) * 4;
	} else {
		__u8 next;
		if (bpf_skb_load_bytes_relative(skb, IPV6_NEXTHDR_OFF, &next, 1,
						BPF_HDR_START_NET) < 0 || next != IPPROTO_UDP)
			return -1;
		if (bpf_skb_load_bytes_relative(skb, IPV6_SADDR_OFF, peer->addr, 16,
						BPF_HDR_START_NET) < 0)
			return -1;
		udp = IPV6_HEADER_LEN;
	}
	/* The UDP header's first field is the source port. */
	return bpf_skb_load_bytes_relative(skb, udp, &peer->port, 2, BPF_HDR_START_NET);
}

int relay_steer_openvpn(struct __sk_buff *skb)
{
	__u8 head[2]; /* opcode and key id, then the peer id's top byte */
	if (bpf_skb_load_bytes(skb, 0, head, 2) == 0
	    && (head[0] >> RELAY_OPCODE_SHIFT) == RELAY_P_DATA_V2)
		return head[1];
	struct relay_peer peer = {};
	__u32 *worker = source(skb, &peer) < 0 ? 0 : relay_steer_openvpn_peers.lookup(&peer);
	return worker ? *worker : RELAY_STEER_HASH;
}

/* Where a ClientHello's session_id begins: its length byte. */
#define HELLO_SID_LEN_OFF (RELAY_DTLS_RECORD_HEADER + RELAY_DTLS_HANDSHAKE_HEADER \
			   + RELAY_DTLS_RANDOM_END)

int relay_steer_dtls(struct __sk_buff *skb)
{
	__u8 content, msg, sid[2]; /* session_id length and first byte */
	if (bpf_skb_load_bytes(skb, 0, &content, 1) == 0
	    && content == RELAY_DTLS_CONTENT_HANDSHAKE
	    && bpf_skb_load_bytes(skb, RELAY_DTLS_RECORD_HEADER, &msg, 1) == 0
	    && msg == RELAY_DTLS_CLIENT_HELLO
	    && bpf_skb_load_bytes(skb, HELLO_SID_LEN_OFF, sid, 2) == 0
	    && sid[0] == RELAY_DTLS_APP_ID_LEN)
		return sid[1];
	struct relay_peer peer = {};
	__u32 *worker = source(skb, &peer) < 0 ? 0 : relay_steer_dtls_peers.lookup(&peer);
	return worker ? *worker : RELAY_STEER_HASH;
}

int relay_steer_tcp(struct __sk_buff *skb)
{
	__u32 zero = 0;
	__u32 *worker = relay_steer_least.lookup(&zero);
	return worker ? *worker : RELAY_STEER_HASH;
}
