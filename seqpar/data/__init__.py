"""Text files the demo reads.

harrowmere.txt: plain fictional prose (a coastal town's history, market days and
lighthouse logbook entries) written for this repository by a fixed-seed template
generator; about 4,000 SmolLM2 tokens, with nothing in it about a vault or a code.
The demo inserts its needle sentence half-way through.
"""
