"""Benchmarks: the one result schema, `medc bench` sweeps and baselines, the roofline, reports and comparisons."""
