"""Execution (the worker's side): the consumer of the orders stream, the driver of
one order's state machine, the router, and the venues."""
