/* The AnyConnect DTLS data channel, server side, on OpenSSL (libssl): see dtls.c.
 *
 * One relay_dtls_server per UDP endpoint holds the SSL_CTX (DTLS 1.2, PSK with
 * AES-GCM or ChaCha20-Poly1305), the stateless cookie key and the SSL object that
 * DTLSv1_listen() runs on; one relay_dtls_chan per peer that answered a cookie
 * holds its SSL object, memory BIOs, PSK and address. The caller owns the UDP
 * socket and passes its descriptor; every datagram a channel makes is sent from
 * here with sendto(2), so Python never copies a record. */
#ifndef RELAY_DTLS_H
#define RELAY_DTLS_H

#include <stddef.h>
#include <stdint.h>

/* Bytes of a struct sockaddr_in6, the largest address a UDP socket reports. */
#define RELAY_DTLS_ADDR_MAX 28
/* The PSK: 32 bytes of the TLS session's RFC 5705 exporter, as openconnect and
 * ocserv derive it (PSK_KEY_SIZE in both). */
#define RELAY_DTLS_PSK_LEN 32
/* Largest plaintext record the relay sends: the 1-byte AnyConnect header and an
 * IP packet of at most 64 KiB (the TAP's largest frame less its Ethernet header). */
#define RELAY_DTLS_MAX_PLAIN (1 + 65536)

/* relay_dtls_listen() outcomes. */
#define RELAY_DTLS_DROP 0     /* not a ClientHello the cookie exchange accepts */
#define RELAY_DTLS_VERIFY 1   /* answered with a HelloVerifyRequest; nothing kept */
#define RELAY_DTLS_ACCEPT 2   /* the cookie checks out: a new channel for the peer */

/* relay_dtls_handshake() / relay_dtls_retransmit() outcomes (and -1: failed). */
#define RELAY_DTLS_MORE 0
#define RELAY_DTLS_DONE 1

struct relay_dtls_server;
struct relay_dtls_chan;

struct relay_dtls_server *relay_dtls_server_new(const uint8_t *cookie_key, size_t key_len,
						uint32_t cookie_slot_s, uint32_t mtu);
void relay_dtls_server_free(struct relay_dtls_server *s);
int relay_dtls_listen(struct relay_dtls_server *s, int fd, const uint8_t *dgram, size_t len,
		      const uint8_t *peer, uint32_t peer_len, struct relay_dtls_chan **out);

void relay_dtls_chan_free(struct relay_dtls_chan *c);
void relay_dtls_set_psk(struct relay_dtls_chan *c, const uint8_t *psk);
void relay_dtls_set_peer(struct relay_dtls_chan *c, const uint8_t *peer, uint32_t peer_len);
int relay_dtls_handshake(struct relay_dtls_chan *c, int fd, const uint8_t *dgram, size_t len);
long relay_dtls_timeout_ms(struct relay_dtls_chan *c);
int relay_dtls_retransmit(struct relay_dtls_chan *c, int fd);
int relay_dtls_recv(struct relay_dtls_chan *c, int fd, const uint8_t *in, size_t slot,
		    const uint32_t *lens, uint32_t n, uint8_t *out, size_t out_cap,
		    uint32_t *data_spans, uint32_t *n_data, uint32_t max_data, uint32_t *ctl_spans,
		    uint32_t *n_ctl, uint32_t max_ctl);
int relay_dtls_send(struct relay_dtls_chan *c, int fd, uint8_t type, const char *data,
		    size_t off, size_t len);
const char *relay_dtls_cipher(struct relay_dtls_chan *c);
int relay_dtls_recv_batch(int fd, uint8_t *buf, size_t slot, uint32_t *lens, uint8_t *addrs,
			  uint32_t *addr_lens, uint32_t n);

int relay_tls_export(uintptr_t ssl, const uint8_t *tls_unique, size_t tls_unique_len,
		     const char *label, size_t label_len, uint8_t *out, size_t out_len);

#endif
