"""Code shared by the fedpers client and server (imports neither side)."""
