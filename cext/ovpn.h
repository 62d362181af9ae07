/* The OpenVPN data channel in batches: AEAD (AES-256-GCM, CHACHA20-POLY1305)
 * through OpenSSL's EVP, the replay window and the packet ids, for all the
 * data packets of one receive at once. The rules, the layout and the
 * pure-Python twin are in relay/protocols/openvpn/datachannel.py (the
 * reference; relay/serve/datachannel.py wraps this file), which must give the
 * same bytes and statuses. */
#ifndef RELAY_OVPN_H
#define RELAY_OVPN_H

#include <stddef.h>
#include <stdint.h>

/* Ciphers (ssl_ncp.c: both AEAD with the same packet layout and implicit IV). */
#define RELAY_OVPN_AES_256_GCM 1
#define RELAY_OVPN_CHACHA20_POLY1305 2
#define RELAY_OVPN_KEY_LEN 32         /* both ciphers: 256-bit keys */
#define RELAY_OVPN_IMPLICIT_IV_LEN 8  /* crypto.c: 12-byte nonce = packet id + 8 */
#define RELAY_OVPN_TAG_LEN 16
#define RELAY_OVPN_KEY_IDS 8          /* ssl_pkt.h KEY_ID_MASK + 1 */
#define RELAY_OVPN_REPLAY_WINDOW 64   /* --replay-window 64, one bit per id */
/* A data packet's overhead: P_DATA_V2 opcode/key id + peer id, packet id, tag. */
#define RELAY_OVPN_V2_OVERHEAD (4 + 4 + RELAY_OVPN_TAG_LEN)
#define RELAY_OVPN_TCP_LEN 2          /* TCP framing: a 16-bit length first */

/* What became of each packet (relay_ovpn_open): the authenticated ones first. */
#define RELAY_OVPN_DATA 0       /* a packet for the tunnel */
#define RELAY_OVPN_PING 1       /* the keepalive ping (ping.c) */
#define RELAY_OVPN_OCC 2        /* an options-consistency message (occ.c) */
#define RELAY_OVPN_NO_KEY 3     /* its key id has no key (yet, or any more) */
#define RELAY_OVPN_SHORT 4      /* shorter than a header, packet id and tag */
#define RELAY_OVPN_REPLAY 5     /* packet id seen before or behind the window */
#define RELAY_OVPN_BAD_TAG 6    /* failed authentication */
#define RELAY_OVPN_MALFORMED 7  /* not a data packet, or larger than the bound */
#define RELAY_OVPN_NSTATUS 8

/* The ping and options-consistency magics (relay.protocols.openvpn.wire's
 * PING_MAGIC and OCC_MAGIC: relay/serve/datachannel.py checks they agree). */
#define RELAY_OVPN_MAGIC_LEN 16
extern const uint8_t relay_ovpn_ping_magic[RELAY_OVPN_MAGIC_LEN];
extern const uint8_t relay_ovpn_occ_magic[RELAY_OVPN_MAGIC_LEN];

/* One key id's keys in the server's direction, its send packet id and its
 * replay window. */
struct relay_ovpn_key;

/* NULL when OpenSSL refuses the cipher or memory runs out. */
struct relay_ovpn_key *relay_ovpn_key_new(int cipher, const uint8_t *encrypt_key,
					  const uint8_t *encrypt_iv, const uint8_t *decrypt_key,
					  const uint8_t *decrypt_iv);
void relay_ovpn_key_free(struct relay_ovpn_key *k);
/* The last packet id sent, the highest received and the window's bits (bit i:
 * id highest - i was accepted), for the differential tests. */
void relay_ovpn_key_state(const struct relay_ovpn_key *k, uint32_t *send_pid,
			  uint32_t *highest, uint64_t *seen);

struct relay_ovpn_opened {
	uint32_t counts[RELAY_OVPN_NSTATUS];  /* packets by status */
	uint32_t n_data;                      /* data spans written */
	uint32_t n;                           /* packets looked at */
	uint64_t end;                         /* relay_ovpn_open_stream: where it stopped */
};

/* Open the data packets buf[spans[2i] .. + spans[2i+1]) (i < n) in place, with
 * the key their key id selects in keys[] (NULL: none): an authenticated packet's
 * plaintext replaces its ciphertext (the bytes of one that fails are undefined).
 * Packet i's status goes to status[i], its plaintext's offset and length in buf
 * to plain[2i], plain[2i+1] when authenticated; the DATA ones' are also listed
 * in data[] in order. Packet ids are checked and committed in order, so a
 * duplicate within the batch is a replay. Returns 0, or -1 when OpenSSL fails
 * (not for a bad packet). */
int relay_ovpn_open(struct relay_ovpn_key *const keys[RELAY_OVPN_KEY_IDS], uint8_t *buf,
		    size_t buf_len, const uint32_t *spans, size_t n, size_t max_packet,
		    uint8_t *status, uint32_t *plain, uint32_t *data, struct relay_ovpn_opened *res);

/* The same for a TCP stream in[start .. in_len): its consecutive complete data
 * packets, each after a 16-bit length, up to max_n of them, their plaintext into
 * out (in_len bytes) at the offsets their ciphertext has in in. Stops before a
 * frame that is incomplete, of length 0 or above max_packet, or not a data
 * packet, and sets res->end to that frame's offset. */
int relay_ovpn_open_stream(struct relay_ovpn_key *const keys[RELAY_OVPN_KEY_IDS],
			   const uint8_t *in, size_t in_len, size_t start, size_t max_packet,
			   size_t max_n, uint8_t *out, uint8_t *status, uint32_t *plain,
			   uint32_t *data, struct relay_ovpn_opened *res);

/* Seal the payloads in[spans[2i] .. + spans[2i+1]) as P_DATA_V2 packets of key
 * k (key id key_id, peer id peer_id), each after a 16-bit length when tcp, one
 * after the other into out (out_len bytes: room for every payload plus its
 * overhead); out_spans[2i], [2i+1] is packet i (with its length). Returns how
 * many were sealed (fewer when the key's packet ids run out, or out is full),
 * their payload bytes in *payload_bytes; -1 when OpenSSL fails. */
long relay_ovpn_seal(struct relay_ovpn_key *k, unsigned key_id, uint32_t peer_id, int tcp,
		     const uint8_t *in, size_t in_len, const uint32_t *spans, size_t n,
		     uint8_t *out, size_t out_len, uint32_t *out_spans, uint64_t *payload_bytes);

/* The datagrams of one recvmmsg (relay_udp_recv) in runs for the OpenVPN UDP
 * endpoint: consecutive datagrams from the same address (addrs: addr_size bytes
 * each) and of the same kind, where a datagram is a data packet (P_DATA_V1, or
 * P_DATA_V2 with its peer id: a run has one) of at most max_packet bytes, or
 * anything else. runs[3r] is the run's first datagram, runs[3r+1] its length,
 * runs[3r+2] 1 for data, 0 otherwise. Returns the number of runs. */
size_t relay_ovpn_udp_runs(const uint8_t *buf, size_t buf_len, const uint32_t *spans, size_t n,
			   const uint8_t *addrs, size_t addr_size, size_t max_packet,
			   uint32_t *runs);

#endif
