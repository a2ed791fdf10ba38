"""The QC dashboard: a server-rendered web application over the archive index (pseudonymized
side only). ``create_app(settings)`` builds it; ``cohortflow dashboard`` serves it."""
