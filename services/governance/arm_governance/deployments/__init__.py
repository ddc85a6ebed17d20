"""Deployments: promoting and rolling back agent versions per environment."""
