"""The fedpers server side: ServerApp, strategy hooks, reply validation, ledger, checkpoints, report."""
