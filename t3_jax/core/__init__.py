"""The T3 core: window partitions, schedules, T3 attention and its sequence-parallel form. Pure functions; imports no model."""
