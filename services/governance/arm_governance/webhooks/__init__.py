"""Notification webhooks: the per-tenant API, secrets and signatures (`service.py`) and the signed, retried delivery through the outbox (`delivery.py`)."""
