"""Tasks, iterations (rounds) and assignments: records and state machines (pure)."""
