/* The AnyConnect DTLS data channel, server side, on OpenSSL.
 *
 * openconnect 9.x offers "PSK-NEGOTIATE" in its CONNECT; the relay answers with an
 * App-ID, and both ends key a DTLS 1.2 PSK handshake with 32 bytes of the TLS
 * session's RFC 5705 exporter (label "EXPORTER-openconnect-psk"), as
 * openconnect's gnutls-dtls.c/openssl-dtls.c and ocserv's worker-vpn.c do. The
 * client puts the App-ID in the ClientHello's session_id; the Python side reads
 * it (relay.protocols.dtls) to find the session.
 *
 * Nothing is kept for a peer before it answers a cookie: relay_dtls_listen() runs
 * OpenSSL's stateless DTLSv1_listen() on one shared SSL object, whose cookie is an
 * HMAC-SHA256 of the peer's address under a key drawn at start and a time slot
 * (the current or the previous one is accepted). Only a ClientHello that echoes
 * a good cookie turns that SSL object into the peer's channel.
 *
 * Every SSL object reads from and writes to memory BIOs: one datagram is written
 * into the read BIO and processed to the end, and whatever the SSL object wrote
 * is sent at once as one datagram to the channel's address with sendto(2) on the
 * caller's socket. A datagram the socket refuses (a full send buffer) is lost, as
 * it would be on the path: DTLS and the tunnelled TCP recover. */
#include "dtls.h"

#include <errno.h>
#include <netinet/in.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/ssl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

/* DTLS 1.2 PSK suites with AEAD ciphers only (RFC 5487 AES-GCM, RFC 7905
 * ChaCha20-Poly1305); the client's order decides, as ocserv's GnuTLS does by
 * default. */
#define DTLS_CIPHERS "PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305"
/* An HMAC-SHA256 cookie, whole: 32 of DTLS 1.2's 255 cookie bytes (RFC 6347
 * 4.2.1); the HelloVerifyRequest is then 60 bytes, smaller than any ClientHello. */
#define COOKIE_LEN 32
/* recvmmsg(2) batch cap; the caller's batch is at most this many datagrams. */
#define RECV_BATCH_MAX 64

struct relay_dtls_server {
	SSL_CTX *ctx;
	SSL *listen;              /* DTLSv1_listen() runs here; NULL until needed */
	BIO_ADDR *listen_peer;
	uint8_t key[32];
	uint32_t slot_s;
	uint32_t mtu;
	/* The address of the datagram being checked, for the cookie callbacks. */
	uint8_t peer[RELAY_DTLS_ADDR_MAX];
	uint32_t peer_len;
};

struct relay_dtls_chan {
	SSL *ssl;
	BIO *rbio, *wbio;         /* owned by ssl */
	uint8_t psk[RELAY_DTLS_PSK_LEN];
	int has_psk;
	uint8_t peer[RELAY_DTLS_ADDR_MAX];
	socklen_t peer_len;
};

/* The record being sealed: the 1-byte header then the packet, contiguous. */
static __thread uint8_t send_buf[RELAY_DTLS_MAX_PLAIN];

static void cookie_of(const struct relay_dtls_server *s, uint64_t slot, uint8_t *out)
{
	uint8_t msg[8 + RELAY_DTLS_ADDR_MAX];
	unsigned int n = COOKIE_LEN;

	for (int i = 0; i < 8; i++)
		msg[i] = (uint8_t)(slot >> (56 - 8 * i));
	memcpy(msg + 8, s->peer, s->peer_len);
	HMAC(EVP_sha256(), s->key, sizeof(s->key), msg, 8 + s->peer_len, out, &n);
}

static uint64_t current_slot(const struct relay_dtls_server *s)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec / s->slot_s;
}

static int cookie_generate(SSL *ssl, unsigned char *cookie, unsigned int *len)
{
	const struct relay_dtls_server *s = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));

	cookie_of(s, current_slot(s), cookie);
	*len = COOKIE_LEN;
	return 1;
}

static int cookie_verify(SSL *ssl, const unsigned char *cookie, unsigned int len)
{
	const struct relay_dtls_server *s = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
	uint8_t want[COOKIE_LEN];
	uint64_t slot = current_slot(s);

	if (len != COOKIE_LEN)
		return 0;
	for (uint64_t back = 0; back < 2 && back <= slot; back++) {
		cookie_of(s, slot - back, want);
		if (CRYPTO_memcmp(want, cookie, COOKIE_LEN) == 0)
			return 1;
	}
	return 0;
}

/* Any identity: openconnect sends "psk"; the key alone authenticates (ocserv's
 * get_psk_key ignores the name too). */
static unsigned int psk_lookup(SSL *ssl, const char *identity, unsigned char *psk,
			       unsigned int max_len)
{
	const struct relay_dtls_chan *c = SSL_get_app_data(ssl);

	(void)identity;
	if (c == NULL || !c->has_psk || max_len < RELAY_DTLS_PSK_LEN)
		return 0;
	memcpy(psk, c->psk, RELAY_DTLS_PSK_LEN);
	return RELAY_DTLS_PSK_LEN;
}

static SSL *new_ssl(struct relay_dtls_server *s)
{
	SSL *ssl = SSL_new(s->ctx);
	BIO *rbio = BIO_new(BIO_s_mem()), *wbio = BIO_new(BIO_s_mem());

	if (ssl == NULL || rbio == NULL || wbio == NULL) {
		SSL_free(ssl);
		BIO_free(rbio);
		BIO_free(wbio);
		return NULL;
	}
	/* An empty read BIO means "wait for the next datagram", not end of file. */
	BIO_set_mem_eof_return(rbio, -1);
	SSL_set_bio(ssl, rbio, wbio);
	/* A memory BIO knows no path MTU: fix the one handshake flights are cut to. */
	SSL_set_options(ssl, SSL_OP_NO_QUERY_MTU);
	SSL_set_mtu(ssl, s->mtu);
	SSL_set_accept_state(ssl);
	return ssl;
}

struct relay_dtls_server *relay_dtls_server_new(const uint8_t *cookie_key, size_t key_len,
						uint32_t cookie_slot_s, uint32_t mtu)
{
	struct relay_dtls_server *s;

	if (key_len != sizeof(s->key) || cookie_slot_s == 0)
		return NULL;
	s = calloc(1, sizeof(*s));
	if (s == NULL)
		return NULL;
	memcpy(s->key, cookie_key, key_len);
	s->slot_s = cookie_slot_s;
	s->mtu = mtu;
	s->ctx = SSL_CTX_new(DTLS_server_method());
	s->listen_peer = BIO_ADDR_new();
	if (s->ctx == NULL || s->listen_peer == NULL
	    || !SSL_CTX_set_min_proto_version(s->ctx, DTLS1_2_VERSION)
	    || !SSL_CTX_set_max_proto_version(s->ctx, DTLS1_2_VERSION)
	    || !SSL_CTX_set_cipher_list(s->ctx, DTLS_CIPHERS)) {
		relay_dtls_server_free(s);
		ERR_clear_error();
		return NULL;
	}
	SSL_CTX_set_app_data(s->ctx, s);
	SSL_CTX_set_psk_server_callback(s->ctx, psk_lookup);
	SSL_CTX_set_cookie_generate_cb(s->ctx, cookie_generate);
	SSL_CTX_set_cookie_verify_cb(s->ctx, cookie_verify);
	/* No session cache or tickets: every channel is keyed by its own TLS session;
	 * no renegotiation: openconnect never asks for it with PSK-NEGOTIATE. */
	SSL_CTX_set_session_cache_mode(s->ctx, SSL_SESS_CACHE_OFF);
	SSL_CTX_set_options(s->ctx, SSL_OP_NO_TICKET | SSL_OP_NO_RENEGOTIATION);
	SSL_CTX_set_read_ahead(s->ctx, 1);
	return s;
}

void relay_dtls_server_free(struct relay_dtls_server *s)
{
	if (s == NULL)
		return;
	SSL_free(s->listen);
	BIO_ADDR_free(s->listen_peer);
	SSL_CTX_free(s->ctx);
	OPENSSL_cleanse(s->key, sizeof(s->key));
	free(s);
}

/* Send what the SSL object wrote, as one datagram: 0, or -errno when the socket
 * refused it (the datagram is lost either way; nothing stays queued). */
static int flush_to(BIO *wbio, int fd, const uint8_t *peer, socklen_t peer_len)
{
	char *p;
	long n = BIO_get_mem_data(wbio, &p);
	int ret = 0;

	if (n <= 0)
		return 0;
	if (sendto(fd, p, (size_t)n, MSG_DONTWAIT, (const struct sockaddr *)peer, peer_len) < 0)
		ret = -errno;
	(void)BIO_reset(wbio);
	return ret;
}

int relay_dtls_listen(struct relay_dtls_server *s, int fd, const uint8_t *dgram, size_t len,
		      const uint8_t *peer, uint32_t peer_len, struct relay_dtls_chan **out)
{
	struct relay_dtls_chan *c;
	BIO *rbio, *wbio;
	int r, sent;

	*out = NULL;
	if (peer_len > RELAY_DTLS_ADDR_MAX || len > INT32_MAX)
		return RELAY_DTLS_DROP;
	if (s->listen == NULL && (s->listen = new_ssl(s)) == NULL) {
		ERR_clear_error();
		return RELAY_DTLS_DROP;
	}
	memcpy(s->peer, peer, peer_len);
	s->peer_len = peer_len;
	rbio = SSL_get_rbio(s->listen);
	wbio = SSL_get_wbio(s->listen);
	BIO_write(rbio, dgram, (int)len);
	r = DTLSv1_listen(s->listen, s->listen_peer);
	sent = BIO_ctrl_pending(wbio) > 0;
	flush_to(wbio, fd, peer, peer_len);
	ERR_clear_error();
	if (r <= 0) {
		(void)BIO_reset(rbio);
		if (r < 0) {  /* the object is in an unknown state: start afresh next time */
			SSL_free(s->listen);
			s->listen = NULL;
		}
		return sent ? RELAY_DTLS_VERIFY : RELAY_DTLS_DROP;
	}
	c = calloc(1, sizeof(*c));
	if (c == NULL) {
		SSL_free(s->listen);
		s->listen = NULL;
		return RELAY_DTLS_DROP;
	}
	c->ssl = s->listen;
	s->listen = NULL;
	c->rbio = rbio;
	c->wbio = wbio;
	memcpy(c->peer, peer, peer_len);
	c->peer_len = peer_len;
	SSL_set_app_data(c->ssl, c);
	*out = c;
	return RELAY_DTLS_ACCEPT;
}

void relay_dtls_chan_free(struct relay_dtls_chan *c)
{
	if (c == NULL)
		return;
	SSL_free(c->ssl);
	OPENSSL_cleanse(c->psk, sizeof(c->psk));
	free(c);
}

void relay_dtls_set_psk(struct relay_dtls_chan *c, const uint8_t *psk)
{
	memcpy(c->psk, psk, RELAY_DTLS_PSK_LEN);
	c->has_psk = 1;
}

void relay_dtls_set_peer(struct relay_dtls_chan *c, const uint8_t *peer, uint32_t peer_len)
{
	if (peer_len > RELAY_DTLS_ADDR_MAX)
		return;
	memcpy(c->peer, peer, peer_len);
	c->peer_len = peer_len;
}

int relay_dtls_handshake(struct relay_dtls_chan *c, int fd, const uint8_t *dgram, size_t len)
{
	int r, e;

	if (dgram != NULL && len > 0 && len <= INT32_MAX)
		BIO_write(c->rbio, dgram, (int)len);
	r = SSL_do_handshake(c->ssl);
	flush_to(c->wbio, fd, c->peer, c->peer_len);
	e = r == 1 ? SSL_ERROR_NONE : SSL_get_error(c->ssl, r);
	ERR_clear_error();
	if (r == 1)
		return RELAY_DTLS_DONE;
	if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
		return RELAY_DTLS_MORE;
	return -1;
}

long relay_dtls_timeout_ms(struct relay_dtls_chan *c)
{
	struct timeval tv;

	if (!DTLSv1_get_timeout(c->ssl, &tv))
		return -1;
	return (long)tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

int relay_dtls_retransmit(struct relay_dtls_chan *c, int fd)
{
	int r = DTLSv1_handle_timeout(c->ssl);

	flush_to(c->wbio, fd, c->peer, c->peer_len);
	ERR_clear_error();
	return r < 0 ? -1 : RELAY_DTLS_MORE;
}

int relay_dtls_recv(struct relay_dtls_chan *c, int fd, const uint8_t *in, size_t slot,
		    const uint32_t *lens, uint32_t n, uint8_t *out, size_t out_cap,
		    uint32_t *data_spans, uint32_t *n_data, uint32_t max_data, uint32_t *ctl_spans,
		    uint32_t *n_ctl, uint32_t max_ctl)
{
	size_t pos = 0;
	uint32_t nd = 0, nc = 0;
	int dead = 0;

	for (uint32_t i = 0; i < n && !dead; i++) {
		if (lens[i] == 0 || lens[i] > slot || out_cap - pos < lens[i])
			continue;
		BIO_write(c->rbio, in + (size_t)i * slot, (int)lens[i]);
		for (;;) {
			/* Plaintext is never longer than its datagram: the room is enough. */
			int r = SSL_read(c->ssl, out + pos, (int)(out_cap - pos));
			if (r > 0) {
				if (out[pos] == 0 /* DATA */) {
					if (r > 1 && nd < max_data) {
						data_spans[2 * nd] = (uint32_t)pos + 1;
						data_spans[2 * nd + 1] = (uint32_t)r - 1;
						nd++;
					}
				} else if (nc < max_ctl) {
					ctl_spans[2 * nc] = (uint32_t)pos;
					ctl_spans[2 * nc + 1] = (uint32_t)r;
					nc++;
				}
				pos += (size_t)r;
				continue;
			}
			int e = SSL_get_error(c->ssl, r);
			if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
				dead = 1;  /* close_notify or a fatal alert from the peer */
			break;
		}
		(void)BIO_reset(c->rbio);
	}
	flush_to(c->wbio, fd, c->peer, c->peer_len);  /* a repeated last flight */
	ERR_clear_error();
	*n_data = nd;
	*n_ctl = nc;
	return dead ? -1 : 0;
}

int relay_dtls_send(struct relay_dtls_chan *c, int fd, uint8_t type, const char *data,
		    size_t off, size_t len)
{
	int r;

	if (len + 1 > sizeof(send_buf))
		return -2;
	send_buf[0] = type;
	memcpy(send_buf + 1, data + off, len);
	r = SSL_write(c->ssl, send_buf, (int)len + 1);
	if (r <= 0) {
		(void)BIO_reset(c->wbio);
		ERR_clear_error();
		return -1;
	}
	return flush_to(c->wbio, fd, c->peer, c->peer_len) < 0 ? -2 : r;
}

const char *relay_dtls_cipher(struct relay_dtls_chan *c)
{
	return SSL_get_cipher_name(c->ssl);
}

int relay_dtls_recv_batch(int fd, uint8_t *buf, size_t slot, uint32_t *lens, uint8_t *addrs,
			  uint32_t *addr_lens, uint32_t n)
{
	struct mmsghdr msgs[RECV_BATCH_MAX];
	struct iovec iov[RECV_BATCH_MAX];
	int got;

	if (n > RECV_BATCH_MAX)
		n = RECV_BATCH_MAX;
	for (uint32_t i = 0; i < n; i++) {
		iov[i].iov_base = buf + (size_t)i * slot;
		iov[i].iov_len = slot;
		memset(&msgs[i].msg_hdr, 0, sizeof(msgs[i].msg_hdr));
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
		msgs[i].msg_hdr.msg_name = addrs + (size_t)i * RELAY_DTLS_ADDR_MAX;
		msgs[i].msg_hdr.msg_namelen = RELAY_DTLS_ADDR_MAX;
	}
	got = recvmmsg(fd, msgs, n, MSG_DONTWAIT, NULL);
	if (got < 0)
		return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -errno;
	for (int i = 0; i < got; i++) {
		/* A datagram longer than a slot was cut: no record in it can be read. */
		lens[i] = (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) ? 0 : msgs[i].msg_len;
		addr_lens[i] = msgs[i].msg_hdr.msg_namelen;
	}
	return got;
}

int relay_tls_export(uintptr_t ptr, const uint8_t *tls_unique, size_t tls_unique_len,
		     const char *label, size_t label_len, uint8_t *out, size_t out_len)
{
	SSL *ssl = (SSL *)ptr;
	uint8_t fin[EVP_MAX_MD_SIZE];
	size_t n;
	int ok;

	/* The pointer must be the connection whose tls-unique the caller read
	 * through the ssl module: one of its Finished messages is that value. */
	if (tls_unique_len == 0 || tls_unique_len > sizeof(fin))
		return -1;
	n = SSL_get_finished(ssl, fin, sizeof(fin));
	ok = n == tls_unique_len && CRYPTO_memcmp(fin, tls_unique, n) == 0;
	n = SSL_get_peer_finished(ssl, fin, sizeof(fin));
	ok = ok || (n == tls_unique_len && CRYPTO_memcmp(fin, tls_unique, n) == 0);
	if (!ok)
		return -1;
	ok = SSL_export_keying_material(ssl, out, out_len, label, label_len, NULL, 0, 0);
	ERR_clear_error();
	return ok == 1 ? 0 : -2;
}
