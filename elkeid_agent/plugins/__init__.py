"""Plugin supervision (PROTOCOL.md section 5): see supervisor.py for the theory of operation."""
