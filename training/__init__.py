"""Offline workflows: `recserve train` (fit the models for one cutoff, write a verified bundle) and
`recserve evaluate` (the holdout table), both running the recommendation chain in chain/offline.py."""
