"""The ledger service: tenants' credits, holds and their journal (front: :mod:`services.ledger.ledger`)."""
