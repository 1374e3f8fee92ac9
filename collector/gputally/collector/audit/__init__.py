"""The auditor's side: everything re-verified and recomputed from a record and public keys alone."""
