"""Payments: how the requestor's tokens move to providers."""
