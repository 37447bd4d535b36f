"""The order execution engine: storage, status fan-out, execution, venues."""
