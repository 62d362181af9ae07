/* The packet record that the eBPF capture (ebpf/capture.c) writes into the BPF
 * ring buffer and the drain (cext/drain.c) reads out of it. One definition for
 * both sides, so their layouts cannot drift apart.
 *
 * Compiled by bcc (clang, BPF target) and by the host C compiler: only fixed-width
 * types, explicit padding, no pointers. Addresses and ports are kept in network
 * byte order exactly as on the wire; the drain converts them when it encodes. */
#ifndef RELAY_RECORD_H
#define RELAY_RECORD_H

/* The uapi fixed-width types: the same header on both sides. */
#include <linux/types.h>

/* Length of a session ID in raw bytes: relay.sessionid.RAW_LEN, whose text form
 * is these bytes in base64url (relay/cext.py refuses a build where they differ). */
#define RELAY_SESSION_ID_LEN 16
/* Room for an IPv6 address; IPv4 addresses take the first 4 bytes, rest zero. */
#define RELAY_ADDR_LEN 16

#define RELAY_FAMILY_V4 4
#define RELAY_FAMILY_V6 6

/* Direction as seen from the client: "in" to the internet (tc ingress of the TAP,
 * the relay writes the client's frame), "out" towards the client (tc egress). */
#define RELAY_DIR_IN 0
#define RELAY_DIR_OUT 1

/* Record flags (relay_record.rflags). */
/* No session had this MAC when the packet passed: kept, with a zero session. */
#define RELAY_RF_UNATTRIBUTED 0x01

/* Value of the session map (key: the session MAC in the low 6 bytes of a __u64,
 * byte 0 of the MAC first in memory, see relay_mac_key in capture.c). */
struct relay_session {
	__u8 session_id[RELAY_SESSION_ID_LEN];
	__u8 client_ip[RELAY_ADDR_LEN];   /* the client's physical address */
	__u16 client_port;                /* host byte order */
	__u8 client_family;               /* RELAY_FAMILY_V4 / _V6 */
	__u8 pad[5];
};

struct relay_record {
	__u64 time_ns;                    /* bpf_ktime_get_ns(); the drain makes it wall clock */
	__u8 session_id[RELAY_SESSION_ID_LEN];
	__u8 client_ip[RELAY_ADDR_LEN];
	__u8 src_ip[RELAY_ADDR_LEN];
	__u8 dst_ip[RELAY_ADDR_LEN];
	__u32 seq;                        /* host byte order from here on */
	__u32 ack;
	__u16 client_port;
	__u16 src_port;
	__u16 dst_port;
	__u16 window;                     /* raw window field, unscaled */
	__u16 payload_len;                /* TCP payload bytes */
	__u8 client_family;
	__u8 family;                      /* of src/dst: RELAY_FAMILY_V4 / _V6 */
	__u8 direction;                   /* RELAY_DIR_IN / _OUT */
	__u8 tcp_flags;                   /* FIN=0x01 SYN=0x02 RST=0x04 PSH=0x08 ACK=0x10 URG=0x20 ECE=0x40 CWR=0x80 */
	__u8 rflags;                      /* RELAY_RF_* */
	__u8 pad[1];
	/* A GSO packet (gso_segs > 1) stands for gso_segs packets of gso_size payload
	 * bytes each (the last one shorter), as the device will send them; the drain
	 * expands it into one record per packet, so these are 0 in the packet log.
	 * payload_len is then the whole packet's. */
	__u16 gso_segs;
	__u16 gso_size;
	__u8 pad2[4];                     /* to 104 bytes, a multiple of 8 */
};

/* Slots of the per-CPU counter array. */
#define RELAY_CNT_RECORDS 0   /* records submitted */
#define RELAY_CNT_DROPS 1     /* ring buffer reservations that failed (ring full) */
#define RELAY_CNT_SLOTS 2

#endif
