#!/usr/bin/env python
"""Django's command line for the example site (``migrate``, ``runserver``, ``test``)."""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # Put the repository root (not this folder) first on the path, so that
    # example_project and django_ocmemcache import from a plain checkout.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
