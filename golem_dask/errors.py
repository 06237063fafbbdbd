"""The one exception tree of golem-dask.

Every error a user can meet derives from :class:`GolemDaskError`.  Errors raised by
third-party libraries (web3, docker, fsspec, sockets) are caught where we call them and
re-raised as one of these, ``from`` the original, with a message that says what to do.
"""

from __future__ import annotations


class GolemDaskError(Exception):
    """Base class of every error raised by golem-dask."""


class ConfigError(GolemDaskError, ValueError):
    """A keyword argument or a ``golem.*`` config value is malformed."""


class ConstraintSyntaxError(GolemDaskError, ValueError):
    """A constraint in Golem's filter language could not be parsed.

    Attributes
    ----------
    text:
        The constraint text.
    position:
        Zero-based index of the offending character in ``text``.
    """

    def __init__(self, message: str, text: str, position: int) -> None:
        self.text = text
        self.position = position
        pointer = " " * position + "^"
        super().__init__(f"{message} at position {position}:\n  {text}\n  {pointer}")


class ProtocolError(GolemDaskError):
    """A message could not be encoded, decoded or verified."""


class MarketError(GolemDaskError):
    """The market backend failed or refused a call."""


class NetworkError(MarketError, ConnectionError):
    """A market backend could not be reached; the call may be retried."""


class NoOffersError(MarketError):
    """No provider's offer matched the demand within the negotiation timeout."""


class ProposalRejected(MarketError):
    """The other party rejected a proposal or an agreement."""


class BudgetExceededError(GolemDaskError):
    """Signing another agreement would exceed the cluster's budget."""


class ActivityError(GolemDaskError):
    """A provider could not deploy, start or run an activity."""


class PaymentError(GolemDaskError):
    """A payment could not be made or verified."""


class InvoiceRejected(PaymentError):
    """A debit note or invoice did not match the requestor's own metering."""
