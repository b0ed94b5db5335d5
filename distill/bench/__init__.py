"""Student-vs-teacher benchmark: task accuracy with test-time selection rules, agreement, cost."""
