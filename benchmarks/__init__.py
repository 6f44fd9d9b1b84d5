"""Benchmarks run from a checkout (not shipped): `python -m benchmarks.peers`, and the scripts
beside this file (`python benchmarks/profile_decode.py ...`)."""
