/* A loss injector for benchmarks and tests: a tc classifier that drops a chosen
 * fraction of the packets crossing a device, at random, as netem's "loss"
 * would (netem is not available on the test machines).
 *
 * Compiled by bcc (relay/netns.py, Topology.inject_loss) with:
 *   RELAY_LOSS_THRESHOLD  a packet is dropped when a fresh bpf_get_prandom_u32()
 *                         is below this value: fraction x 2^32
 * Each packet is an independent draw (a Bernoulli process, netem's plain loss). */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

int relay_loss(struct __sk_buff *skb)
{
	if (bpf_get_prandom_u32() < (__u32)RELAY_LOSS_THRESHOLD)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}
