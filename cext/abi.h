/* ABI stamp of relay._cext: the Python side refuses a stale build whose stamp
 * differs from relay.cext.EXPECTED_ABI (rebuild with `pip install .`). */
#ifndef RELAY_ABI_H
#define RELAY_ABI_H

#define RELAY_CEXT_ABI 3

int relay_cext_abi(void);

#endif
