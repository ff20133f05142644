"""The ``fedpers`` command line."""
