"""The dispatch wing: the dispatcher (cursor, exactly-once follow-ups, retries, dead
letters), which handlers run (loader), and the handlers that ship: the built-in chain,
the lane actuator and webhook forwarding. The handler API users import is
`orxaq_autonomy.handlers`."""
