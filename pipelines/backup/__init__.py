"""Backing up and restoring what cannot be made again: the index (an online copy of SQLite, a
``pg_dump`` of PostgreSQL) and the keys (the project key: pseudonym continuity; the archive key
ring: the archive's readability). The archive itself is content-addressed and written once:
copy it with any file tool (README, "What to back up, and upgrades")."""
