"""Benchmarks: scripts that write JSON + PNG under bench/results and tables in docs/benchmarks.md.
Installed with the package so that ``gemserve bench`` imports bench/prefill.py plainly; they write
into the source checkout they sit in."""
