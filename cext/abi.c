#include "abi.h"

int relay_cext_abi(void)
{
	return RELAY_CEXT_ABI;
}
