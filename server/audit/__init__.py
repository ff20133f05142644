"""Privacy audits of a run: the ledger audit and its report, and the one-run canary audit.

``fedpers audit ledger`` recomputes every client's ε from the ledger with independent accountants
(:mod:`server.audit.ledger`) and writes the report (:mod:`server.audit.report`); ``fedpers audit canary``
measures an empirical lower bound on ε by training once with gradient canaries
(:mod:`server.audit.canary`). The canary audit imports torch, so it is imported from its module, not
here: the ledger audit stays light.
"""

from server.audit.ledger import AuditError, ClientAudit, audit_ledger, find_ledger, load_ledger
from server.audit.report import rows, write_audit

__all__ = ["AuditError", "ClientAudit", "audit_ledger", "find_ledger", "load_ledger", "rows", "write_audit"]
