"""Operating it: the ``coordinator`` CLI, status, tail, presence and logging."""
