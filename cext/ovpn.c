/* The OpenVPN data channel in batches; see ovpn.h, and for the rules the
 * pure-Python twin relay/protocols/openvpn/datachannel.py. Every byte of a
 * packet is the peer's: each read is bound-checked against its span first. */
#include "ovpn.h"

#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

/* ssl_pkt.h: the opcode in the top 5 bits, the key id in the low 3. */
#define OP_DATA_V1 6
#define OP_DATA_V2 9
#define OPCODE_SHIFT 3
#define KEY_ID_MASK 7
#define PID_LEN 4
#define NONCE_LEN (PID_LEN + RELAY_OVPN_IMPLICIT_IV_LEN)
/* The largest packet a 16-bit TCP length can frame; the seal skips a payload
 * that would not fit (the TAP's frames are far smaller). */
#define MAX_SEALED 0xFFFF

const uint8_t relay_ovpn_ping_magic[RELAY_OVPN_MAGIC_LEN] = {
	0x2a, 0x18, 0x7b, 0xf3, 0x64, 0x1e, 0xb4, 0xcb,
	0x07, 0xed, 0x2d, 0x0a, 0x98, 0x1f, 0xc7, 0x48};
const uint8_t relay_ovpn_occ_magic[RELAY_OVPN_MAGIC_LEN] = {
	0x28, 0x7f, 0x34, 0x6b, 0xd4, 0xef, 0x7a, 0x81,
	0x2d, 0x56, 0xb8, 0xd3, 0xaf, 0xc5, 0x45, 0x9c};

struct relay_ovpn_key {
	EVP_CIPHER_CTX *enc;
	EVP_CIPHER_CTX *dec;
	uint8_t enc_iv[RELAY_OVPN_IMPLICIT_IV_LEN];
	uint8_t dec_iv[RELAY_OVPN_IMPLICIT_IV_LEN];
	uint32_t send_pid;  /* the last packet id sent; 0 before the first */
	uint32_t highest;   /* the highest packet id accepted; 0 before the first */
	uint64_t seen;      /* bit i: id highest - i was accepted */
};

static inline uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void put_be32(uint8_t *p, uint32_t v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

struct relay_ovpn_key *relay_ovpn_key_new(int cipher, const uint8_t *encrypt_key,
					  const uint8_t *encrypt_iv, const uint8_t *decrypt_key,
					  const uint8_t *decrypt_iv)
{
	const EVP_CIPHER *c;
	if (cipher == RELAY_OVPN_AES_256_GCM)
		c = EVP_aes_256_gcm();
	else if (cipher == RELAY_OVPN_CHACHA20_POLY1305)
		c = EVP_chacha20_poly1305();
	else
		return NULL;
	struct relay_ovpn_key *k = calloc(1, sizeof(*k));
	if (!k)
		return NULL;
	k->enc = EVP_CIPHER_CTX_new();
	k->dec = EVP_CIPHER_CTX_new();
	/* The key schedule once; each packet then sets only its nonce (12 bytes,
	 * both ciphers' default IV length). */
	if (!k->enc || !k->dec || EVP_EncryptInit_ex(k->enc, c, NULL, encrypt_key, NULL) != 1
	    || EVP_DecryptInit_ex(k->dec, c, NULL, decrypt_key, NULL) != 1
	    || EVP_CIPHER_CTX_get_iv_length(k->enc) != NONCE_LEN) {
		relay_ovpn_key_free(k);
		return NULL;
	}
	memcpy(k->enc_iv, encrypt_iv, sizeof(k->enc_iv));
	memcpy(k->dec_iv, decrypt_iv, sizeof(k->dec_iv));
	return k;
}

void relay_ovpn_key_free(struct relay_ovpn_key *k)
{
	if (!k)
		return;
	EVP_CIPHER_CTX_free(k->enc);
	EVP_CIPHER_CTX_free(k->dec);
	OPENSSL_cleanse(k, sizeof(*k));
	free(k);
}

void relay_ovpn_key_state(const struct relay_ovpn_key *k, uint32_t *send_pid, uint32_t *highest,
			  uint64_t *seen)
{
	*send_pid = k->send_pid;
	*highest = k->highest;
	*seen = k->seen;
}

/* --- the replay window (packet_id.c, --replay-window 64) -------------------- */

static int replay_ok(const struct relay_ovpn_key *k, uint32_t pid)
{
	if (pid == 0)
		return 0;
	if (pid > k->highest)
		return 1;
	uint32_t back = k->highest - pid;
	return back < RELAY_OVPN_REPLAY_WINDOW && !((k->seen >> back) & 1);
}

/* An id that replay_ok passed and that authenticated. */
static void replay_commit(struct relay_ovpn_key *k, uint32_t pid)
{
	if (pid > k->highest) {
		uint32_t shift = pid - k->highest;
		k->seen = shift >= RELAY_OVPN_REPLAY_WINDOW ? 1 : (k->seen << shift) | 1;
		k->highest = pid;
	} else {
		k->seen |= (uint64_t)1 << (k->highest - pid);
	}
}

/* --- opening ------------------------------------------------------------------ */

/* One packet p[0..len); its plaintext goes to dst + (its ciphertext's offset in p),
 * where dst is p itself (in place) or the packet's place in another buffer. The
 * status, or -1 when OpenSSL fails. */
static int open_one(struct relay_ovpn_key *const keys[RELAY_OVPN_KEY_IDS], const uint8_t *p,
		    size_t len, size_t max_packet, uint8_t *dst, uint32_t *plain_off,
		    uint32_t *plain_len)
{
	if (len == 0 || len > max_packet)
		return RELAY_OVPN_MALFORMED;
	unsigned op = p[0] >> OPCODE_SHIFT;
	if (op != OP_DATA_V1 && op != OP_DATA_V2)
		return RELAY_OVPN_MALFORMED;
	struct relay_ovpn_key *k = keys[p[0] & KEY_ID_MASK];
	if (!k)
		return RELAY_OVPN_NO_KEY;
	/* P_DATA_V2: opcode and peer id, all authenticated; P_DATA_V1: the opcode
	 * byte, and only the packet id is authenticated (crypto.c). */
	size_t head = op == OP_DATA_V2 ? 4 : 1;
	size_t ct_off = head + PID_LEN + RELAY_OVPN_TAG_LEN;
	if (len < ct_off)
		return RELAY_OVPN_SHORT;
	const uint8_t *pid_bytes = p + head;
	uint32_t pid = be32(pid_bytes);
	if (!replay_ok(k, pid))
		return RELAY_OVPN_REPLAY;
	uint8_t nonce[NONCE_LEN], tag[RELAY_OVPN_TAG_LEN];
	memcpy(nonce, pid_bytes, PID_LEN);
	memcpy(nonce + PID_LEN, k->dec_iv, RELAY_OVPN_IMPLICIT_IV_LEN);
	memcpy(tag, pid_bytes + PID_LEN, RELAY_OVPN_TAG_LEN);
	const uint8_t *aad = op == OP_DATA_V2 ? p : pid_bytes;
	int aad_len = (int)(pid_bytes + PID_LEN - aad);
	int ct_len = (int)(len - ct_off);
	uint8_t *out = dst + ct_off;
	int n = 0, fin = 0;
	EVP_CIPHER_CTX *ctx = k->dec;
	if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1
	    || EVP_DecryptUpdate(ctx, NULL, &n, aad, aad_len) != 1
	    || (ct_len > 0 && EVP_DecryptUpdate(ctx, out, &n, p + ct_off, ct_len) != 1)
	    || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, RELAY_OVPN_TAG_LEN, tag) != 1)
		return -1;
	if (ct_len == 0)
		n = 0;
	if (EVP_DecryptFinal_ex(ctx, out + n, &fin) != 1)
		return RELAY_OVPN_BAD_TAG;
	replay_commit(k, pid);
	*plain_off = (uint32_t)ct_off;
	*plain_len = (uint32_t)ct_len;
	if (ct_len >= RELAY_OVPN_MAGIC_LEN) {
		if (ct_len == RELAY_OVPN_MAGIC_LEN
		    && !memcmp(out, relay_ovpn_ping_magic, RELAY_OVPN_MAGIC_LEN))
			return RELAY_OVPN_PING;
		if (!memcmp(out, relay_ovpn_occ_magic, RELAY_OVPN_MAGIC_LEN))
			return RELAY_OVPN_OCC;
	}
	return RELAY_OVPN_DATA;
}

/* The packet at in[off .. off + len): open it into dst (its place in the output),
 * note what became of it. */
static int open_at(struct relay_ovpn_key *const keys[RELAY_OVPN_KEY_IDS], const uint8_t *in,
		   size_t off, size_t len, size_t max_packet, uint8_t *dst, uint8_t *status,
		   uint32_t *plain, uint32_t *data, struct relay_ovpn_opened *res)
{
	uint32_t poff = 0, plen = 0;
	int st = open_one(keys, in + off, len, max_packet, dst, &poff, &plen);
	if (st < 0)
		return -1;
	size_t i = res->n++;
	status[i] = (uint8_t)st;
	res->counts[st]++;
	plain[2 * i] = (uint32_t)off + poff;
	plain[2 * i + 1] = plen;
	if (st == RELAY_OVPN_DATA) {
		data[2 * res->n_data] = (uint32_t)off + poff;
		data[2 * res->n_data + 1] = plen;
		res->n_data++;
	}
	return 0;
}

int relay_ovpn_open(struct relay_ovpn_key *const keys[RELAY_OVPN_KEY_IDS], uint8_t *buf,
		    size_t buf_len, const uint32_t *spans, size_t n, size_t max_packet,
		    uint8_t *status, uint32_t *plain, uint32_t *data, struct relay_ovpn_opened *res)
{
	memset(res, 0, sizeof(*res));
	for (size_t i = 0; i < n; i++) {
		size_t off = spans[2 * i], len = spans[2 * i + 1];
		if (off > buf_len || len > buf_len - off)
			off = len = 0;  /* a span outside the buffer: malformed, read nothing */
		if (open_at(keys, buf, off, len, max_packet, buf + off, status, plain, data, res) < 0)
			return -1;
	}
	return 0;
}

int relay_ovpn_open_stream(struct relay_ovpn_key *const keys[RELAY_OVPN_KEY_IDS],
			   const uint8_t *in, size_t in_len, size_t start, size_t max_packet,
			   size_t max_n, uint8_t *out, uint8_t *status, uint32_t *plain,
			   uint32_t *data, struct relay_ovpn_opened *res)
{
	memset(res, 0, sizeof(*res));
	size_t pos = start;
	while (res->n < max_n && pos <= in_len && in_len - pos > RELAY_OVPN_TCP_LEN) {
		size_t len = (size_t)in[pos] << 8 | in[pos + 1];
		size_t first = pos + RELAY_OVPN_TCP_LEN;
		unsigned op = in[first] >> OPCODE_SHIFT;
		if (len == 0 || len > max_packet || len > in_len - first
		    || (op != OP_DATA_V1 && op != OP_DATA_V2))
			break;
		if (open_at(keys, in, first, len, max_packet, out + first, status, plain, data,
			    res) < 0)
			return -1;
		pos = first + len;
	}
	res->end = pos;
	return 0;
}

/* --- sealing ------------------------------------------------------------------ */

long relay_ovpn_seal(struct relay_ovpn_key *k, unsigned key_id, uint32_t peer_id, int tcp,
		     const uint8_t *in, size_t in_len, const uint32_t *spans, size_t n,
		     uint8_t *out, size_t out_len, uint32_t *out_spans, uint64_t *payload_bytes)
{
	size_t pos = 0, frame = tcp ? RELAY_OVPN_TCP_LEN : 0;
	long sealed = 0;
	*payload_bytes = 0;
	EVP_CIPHER_CTX *ctx = k->enc;
	for (size_t i = 0; i < n; i++) {
		size_t off = spans[2 * i], len = spans[2 * i + 1];
		size_t pkt_len = RELAY_OVPN_V2_OVERHEAD + len;
		if (off > in_len || len > in_len - off || pkt_len > MAX_SEALED)
			continue;
		if (k->send_pid == UINT32_MAX || out_len - pos < frame + pkt_len)
			break;  /* ids used up (the client renegotiates long before), or no room */
		uint32_t pid = ++k->send_pid;
		uint8_t *p = out + pos;
		if (tcp) {
			p[0] = (uint8_t)(pkt_len >> 8);
			p[1] = (uint8_t)pkt_len;
			p += RELAY_OVPN_TCP_LEN;
		}
		p[0] = (uint8_t)(OP_DATA_V2 << OPCODE_SHIFT | (key_id & KEY_ID_MASK));
		p[1] = (uint8_t)(peer_id >> 16);
		p[2] = (uint8_t)(peer_id >> 8);
		p[3] = (uint8_t)peer_id;
		put_be32(p + 4, pid);
		uint8_t nonce[NONCE_LEN];
		memcpy(nonce, p + 4, PID_LEN);
		memcpy(nonce + PID_LEN, k->enc_iv, RELAY_OVPN_IMPLICIT_IV_LEN);
		uint8_t *tag = p + 8;
		uint8_t *ct = tag + RELAY_OVPN_TAG_LEN;
		int m = 0, fin = 0;
		if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1
		    || EVP_EncryptUpdate(ctx, NULL, &m, p, 8) != 1
		    || (len > 0 && EVP_EncryptUpdate(ctx, ct, &m, in + off, (int)len) != 1))
			return -1;
		if (len == 0)
			m = 0;
		if (EVP_EncryptFinal_ex(ctx, ct + m, &fin) != 1
		    || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, RELAY_OVPN_TAG_LEN, tag) != 1)
			return -1;
		out_spans[2 * sealed] = (uint32_t)pos;
		out_spans[2 * sealed + 1] = (uint32_t)(frame + pkt_len);
		sealed++;
		pos += frame + pkt_len;
		*payload_bytes += len;
	}
	return sealed;
}

/* --- UDP runs ------------------------------------------------------------------- */

/* 1 when p[0..len) is a data packet the endpoint hands to a session's batch. */
static int is_data(const uint8_t *p, size_t len, size_t max_packet)
{
	if (len == 0 || len > max_packet)
		return 0;
	unsigned op = p[0] >> OPCODE_SHIFT;
	return op == OP_DATA_V1 || (op == OP_DATA_V2 && len >= 4);
}

size_t relay_ovpn_udp_runs(const uint8_t *buf, size_t buf_len, const uint32_t *spans, size_t n,
			   const uint8_t *addrs, size_t addr_size, size_t max_packet,
			   uint32_t *runs)
{
	size_t nr = 0;
	const uint8_t *prev = NULL;  /* the current run's first datagram, when data */
	for (size_t i = 0; i < n; i++) {
		size_t off = spans[2 * i], len = spans[2 * i + 1];
		const uint8_t *p = buf + off;
		int data = off <= buf_len && len <= buf_len - off && is_data(p, len, max_packet);
		if (nr > 0 && runs[3 * (nr - 1) + 2] == (uint32_t)data
		    && !memcmp(addrs + i * addr_size, addrs + runs[3 * (nr - 1)] * addr_size,
			       addr_size)
		    && (!data || (prev[0] >> OPCODE_SHIFT == p[0] >> OPCODE_SHIFT
				  && (p[0] >> OPCODE_SHIFT != OP_DATA_V2
				      || !memcmp(prev + 1, p + 1, 3))))) {
			runs[3 * (nr - 1) + 1]++;
			continue;
		}
		runs[3 * nr] = (uint32_t)i;
		runs[3 * nr + 1] = 1;
		runs[3 * nr + 2] = (uint32_t)data;
		nr++;
		prev = data ? p : NULL;
	}
	return nr;
}
