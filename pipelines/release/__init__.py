"""The release check: a folder searched for identifiers before it leaves (scan.py)."""
