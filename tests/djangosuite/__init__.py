"""Django's own cache test class, run against this backend (see ``runner.py``)."""
