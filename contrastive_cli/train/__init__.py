"""Training: the state, optimizer, the one jitted step, run directory, logbook, guards, probe, loop."""
