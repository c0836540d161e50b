"""Search: Port's query language compiled to SQL, run with keyset pagination."""
