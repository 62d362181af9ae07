/*
 * tapgen: write TCP/IPv4 Ethernet frames into an existing TAP device at a
 * target rate, for bench/capture.py (compiled there with gcc; never committed
 * as a binary).
 *
 *   tapgen DEV PPS SECONDS SESSIONS
 *
 * Run inside the device's network namespace. Frames come from SESSIONS source
 * MACs 02:b0:00:00:00:01.. (bench/capture.py registers the same ones in the
 * capture's session map), spread over FLOWS TCP flows whose sequence numbers
 * advance by the payload; payload lengths cycle through PAYLOADS (pure ACKs and
 * data, so a 96-byte snaplen cuts some frames and not others). Prints one JSON
 * line: frames written, seconds taken, and the CPU seconds this process used
 * (the kernel's receive path, capture hooks included, runs in its context).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

/* Flows spread over the sessions: enough distinct ports and sequence spaces
 * that the packet log's per-flow tables are exercised as by real traffic. */
#define FLOWS 64
/* Check the clock every this many frames: a clock read per frame would cost
 * more than the write at high rates. */
#define PACE_BATCH 32
#define ETH_HLEN 14
#define IP_HLEN 20
#define TCP_HLEN 32 /* with NOP NOP timestamps, as Linux sends */
#define MAX_PAYLOAD 1000

static const int PAYLOADS[] = {0, 0, 100, MAX_PAYLOAD};
#define N_PAYLOADS (int)(sizeof(PAYLOADS) / sizeof(PAYLOADS[0]))

static double now_s(clockid_t clk) {
	struct timespec ts;
	clock_gettime(clk, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v & 0xff; }
static void put32(uint8_t *p, uint32_t v) { put16(p, v >> 16); put16(p + 2, v & 0xffff); }

int main(int argc, char **argv) {
	if (argc != 5) {
		fprintf(stderr, "usage: tapgen DEV PPS SECONDS SESSIONS\n");
		return 2;
	}
	const char *dev = argv[1];
	double pps = atof(argv[2]), seconds = atof(argv[3]);
	int sessions = atoi(argv[4]);
	if (pps <= 0 || seconds <= 0 || sessions < 1 || sessions > 255) {
		fprintf(stderr, "tapgen: bad arguments\n");
		return 2;
	}
	int fd = open("/dev/net/tun", O_RDWR);
	struct ifreq ifr = {0};
	strncpy(ifr.ifr_name, dev, IFNAMSIZ - 1);
	ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
	if (fd < 0 || ioctl(fd, TUNSETIFF, &ifr) < 0) {
		perror("tapgen: TUNSETIFF");
		return 1;
	}
	uint32_t seq[FLOWS];
	for (int f = 0; f < FLOWS; f++)
		seq[f] = 0x10000000u * (uint32_t)(f % 16) + 1;
	static uint8_t frame[ETH_HLEN + IP_HLEN + TCP_HLEN + MAX_PAYLOAD];
	memset(frame, 'x', sizeof(frame));
	uint64_t total = (uint64_t)(pps * seconds), sent = 0, failed = 0;
	uint64_t rng = 0x9e3779b97f4a7c15ull; /* xorshift64: fixed seed, same traffic every run */
	double t0 = now_s(CLOCK_MONOTONIC);
	while (sent + failed < total) {
		uint64_t k = sent + failed;
		rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
		int f = (int)(rng % FLOWS), s = f % sessions + 1;
		int len = PAYLOADS[(rng >> 32) % N_PAYLOADS];
		uint8_t *e = frame, *ip = frame + ETH_HLEN, *tcp = ip + IP_HLEN;
		static const uint8_t dst_mac[6] = {0x02, 0xee, 0, 0, 0, 0xee};
		memcpy(e, dst_mac, 6);
		const uint8_t src_mac[6] = {0x02, 0xb0, 0, 0, 0, (uint8_t)s};
		memcpy(e + 6, src_mac, 6);
		put16(e + 12, 0x0800);
		ip[0] = 0x45; ip[1] = 0;
		put16(ip + 2, IP_HLEN + TCP_HLEN + len);
		put16(ip + 4, (uint16_t)k); put16(ip + 6, 0x4000);
		ip[8] = 64; ip[9] = 6; put16(ip + 10, 0);
		const uint8_t saddr[4] = {10, 211, 0, (uint8_t)(s + 1)};
		const uint8_t daddr[4] = {198, 19, 0, (uint8_t)(2 + f % 8)};
		memcpy(ip + 12, saddr, 4); memcpy(ip + 16, daddr, 4);
		put16(tcp, 20000 + f); put16(tcp + 2, f % 2 ? 443 : 80);
		put32(tcp + 4, seq[f]); put32(tcp + 8, 0x20000000u + (uint32_t)k);
		tcp[12] = (TCP_HLEN / 4) << 4; tcp[13] = len ? 0x18 : 0x10; /* PSH,ACK : ACK */
		put16(tcp + 14, 502); put16(tcp + 16, 0); put16(tcp + 18, 0);
		const uint8_t opts[12] = {1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2};
		memcpy(tcp + 20, opts, sizeof(opts));
		seq[f] += len;
		if (write(fd, frame, ETH_HLEN + IP_HLEN + TCP_HLEN + len) < 0)
			failed++;
		else
			sent++;
		if ((sent + failed) % PACE_BATCH == 0) {
			/* Ahead of schedule: sleep it off rather than spin, so the
			 * generator leaves the other core to the capture. */
			double ahead = (sent + failed) / pps - (now_s(CLOCK_MONOTONIC) - t0);
			if (ahead > 0) {
				struct timespec ts = {(time_t)ahead, (long)((ahead - (time_t)ahead) * 1e9)};
				nanosleep(&ts, NULL);
			}
		}
	}
	double elapsed = now_s(CLOCK_MONOTONIC) - t0;
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
	             ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
	printf("{\"written\": %llu, \"failed\": %llu, \"seconds\": %.6f, \"cpu_seconds\": %.6f}\n",
	       (unsigned long long)sent, (unsigned long long)failed, elapsed, cpu);
	return 0;
}
