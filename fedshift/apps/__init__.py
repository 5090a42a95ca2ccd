"""L7, the applications: the CLI, compare, report, docgen, bench (with its memory probes and the plain-Flower
baseline)."""
