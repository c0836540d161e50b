"""Small shared pieces that know no domain: errors, ids, HTTP plumbing, logging."""
