"""Benchmarks: the BenchResult record, the bench runner behind `medc bench`, and full-size benchmark scripts."""
