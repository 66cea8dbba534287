"""What the server and the SDK agree on beyond the proto: the names of metadata.

Both ends import these, so a refusal the server writes is one the SDK can read.
"""

# Request metadata carrying the caller's key: ``authorization: Bearer <api key>``.
AUTHORIZATION_METADATA = "authorization"
BEARER_PREFIX = "Bearer "
# Trailing metadata of a call refused because another replica serves the session: that
# replica's address. Nothing was done; the SDK sends the call there.
OWNER_METADATA = "memsvc-owner"
# Trailing metadata of an append refused for its expected position: the session's position.
POSITION_METADATA = "memsvc-position"
