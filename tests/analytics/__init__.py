"""Analytics end to end: mail through the whole mesh with simulated faults, checked against the stats it reports."""
