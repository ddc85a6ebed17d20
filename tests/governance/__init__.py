"""Tests of the governance service."""
