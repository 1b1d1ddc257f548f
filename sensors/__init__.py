"""The sensor side: wire format, transport, drivers, MCAP recording and replay, inspection."""
