"""Authentication: machine credentials, access tokens, the Principal dependency."""
