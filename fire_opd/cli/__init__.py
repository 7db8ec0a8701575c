"""The command line: `fire-opd train | eval | demo | study` (main.py); input checks that run before
any model loads (preflight.py)."""
