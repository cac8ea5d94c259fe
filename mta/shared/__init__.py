"""State several relays share through Redis (``[shared]``): the MTA-STS policy cache
and the TLS-RPT counts. Every value is sealed under the fleet key; key names hide
domains; a Redis outage falls back to each relay's local state."""
