"""Running cohortflow as a service: systemd units (``services.py``, templates in
``systemd/``) and the Prefect server's set-up for the deployments (``prefect_setup.py``)."""
