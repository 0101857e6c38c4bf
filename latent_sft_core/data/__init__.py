"""Data sources and the raw split schema: synthetic GSM8k-Aug-style problems, text and JSON Lines files, the Hub."""
