"""Running the processes: the event loop and GC settings, the pre-fork supervisor, the embedded redis-server, logging."""
